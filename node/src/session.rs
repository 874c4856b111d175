//! A client WebSocket session: decoding requests, answering them, and
//! writing what the shards queue for it.
//!
//! One task per connection does both reading and writing, which keeps an
//! idle session small. Everything for the client goes through its outbox,
//! so replies and messages keep one order, and the writer sends all that is
//! queued as one frame with one flush.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use protocol::{Codec, ErrorCode, Reply, Request, RequestError};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, error, warn, Instrument};

use crate::admission::ConnectionPermit;
use crate::auth::Grants;
use crate::client::ClientContext;
use crate::lifecycle::Phase;
use crate::metrics::METRICS;
use crate::outbox::{close_code, next_session_id, outbox, Outbox, SessionHandle, SessionId};
use crate::owner::SubKey;
use crate::shard::{Ack, Publish};

pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Largest frame the writer builds from queued objects; more is split.
const MAX_BATCH_FRAME: usize = crate::outbox::FULL_BATCH_BYTES;
/// Writes before the session goes back to reading, when the queue keeps
/// refilling.
const MAX_WRITE_ROUNDS: usize = 4;
/// How long a closing session waits for the client's side of the close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How a session ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// The node closes it with this code.
    Close(u16),
    /// The client closed it (or the connection broke).
    Gone(Option<u16>),
}

struct Session {
    id: SessionId,
    handle: SessionHandle,
    ctx: Arc<ClientContext>,
    /// `None` when auth is off: everything is allowed.
    grants: Option<Grants>,
    subscriptions: HashSet<SubKey>,
}

/// Runs a session to its end. Never panics: a panic inside is caught,
/// logged and counted, and ends this session only.
pub async fn run(
    mut socket: Socket,
    ctx: Arc<ClientContext>,
    codec: Codec,
    grants: Option<Grants>,
    permit: ConnectionPermit,
) {
    let id = next_session_id();
    let (handle, mut outbox) = outbox(
        id,
        codec,
        ctx.limits.outbound_queue,
        ctx.limits.outbound_queue_bytes,
    );
    METRICS.connects.inc();
    METRICS.connections.inc();
    METRICS.codec_connections(codec).inc();
    // Every line about the session carries the node and session ids.
    let span = tracing::info_span!("session", node_id = %ctx.node_id, session_id = id);
    span.in_scope(|| debug!(codec = codec.name(), "session opened"));

    let mut session = Session {
        id,
        handle,
        ctx: ctx.clone(),
        grants,
        subscriptions: HashSet::new(),
    };
    let served = AssertUnwindSafe(session.serve(&mut socket, &mut outbox))
        .catch_unwind()
        .instrument(span.clone())
        .await;
    let end = match served {
        Ok(end) => end,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            METRICS.session_panics.inc();
            error!(session_id = id, panic = %what, "session handler panicked; closing this session only");
            End::Close(close_code::INTERNAL_ERROR)
        }
    };
    // Stop shards queueing for this session before the goodbye.
    drop(outbox);
    let code = match end {
        End::Close(code) => {
            close_socket(&mut socket, code).await;
            Some(code)
        }
        End::Gone(code) => {
            let _ = tokio::time::timeout(CLOSE_LINGER, socket.close(None)).await;
            code
        }
    };
    METRICS.disconnected(code);
    METRICS.connections.dec();
    METRICS.codec_connections(codec).dec();
    span.in_scope(|| debug!(close_code = code, "session closed"));
    let keys: Vec<SubKey> = session.subscriptions.drain().collect();
    METRICS.subscriptions.add(-(keys.len() as i64));
    ctx.router.forget_session(id, keys).await;
    drop(permit);
}

/// Closes a connection refused by admission control, before any session
/// state exists.
pub async fn refuse(mut socket: Socket, code: u16) {
    close_socket(&mut socket, code).await;
}

/// Sends a close frame, then reads until the client answers (bounded), so
/// the close frame is not lost to a reset.
async fn close_socket(socket: &mut Socket, code: u16) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(""),
    };
    let linger = async {
        if socket.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = socket.next().await {}
        }
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, linger).await;
}

impl Session {
    async fn serve(&mut self, socket: &mut Socket, outbox: &mut Outbox) -> End {
        let limits = self.ctx.limits.clone();
        let ready_signal = outbox.ready_signal();
        let mut ready = std::pin::pin!(ready_signal.notified());
        let start = tokio::time::Instant::now();
        let mut ping = tokio::time::interval_at(start + limits.ping_interval, limits.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = start;
        let idle = std::pin::pin!(tokio::time::sleep_until(start + limits.idle_timeout));
        let mut idle = idle;
        let expiry = self
            .grants
            .as_ref()
            .and_then(Grants::expires_in)
            .map(|left| start + left)
            .unwrap_or(start + Duration::from_secs(10 * 365 * 24 * 3600));
        let expiry = std::pin::pin!(tokio::time::sleep_until(expiry));
        let mut expiry = expiry;
        let mut phase = self.ctx.lifecycle.watch();
        if *phase.borrow() == Phase::Closing {
            return End::Close(close_code::GOING_AWAY);
        }
        // With `client.write_delay`, messages queued within that long of the
        // last write wait for this timer, to go out together.
        let write_delay = limits.write_delay;
        let mut last_write = None;
        let mut holding = false;
        let held = std::pin::pin!(tokio::time::sleep_until(start));
        let mut held = held;

        loop {
            tokio::select! {
                biased;
                _ = &mut ready => {
                    ready.set(ready_signal.notified());
                    match hold_until(outbox, last_write, write_delay) {
                        Some(due) => {
                            if !holding {
                                held.as_mut().reset(due);
                                holding = true;
                            }
                        }
                        None => {
                            holding = false;
                            let written = self.write_queued(socket, outbox, &ready_signal).await;
                            if let Some(end) = written {
                                return end;
                            }
                            if !write_delay.is_zero() {
                                last_write = Some(tokio::time::Instant::now());
                            }
                        }
                    }
                }
                _ = &mut held, if holding => {
                    holding = false;
                    if let Some(end) = self.write_queued(socket, outbox, &ready_signal).await {
                        return end;
                    }
                    last_write = Some(tokio::time::Instant::now());
                }
                incoming = socket.next() => {
                    last_heard = tokio::time::Instant::now();
                    match incoming {
                        None => return End::Gone(None),
                        Some(Ok(message)) => {
                            if let Some(end) = self.on_message(message).await {
                                return end;
                            }
                        }
                        Some(Err(tungstenite::Error::Capacity(e))) => {
                            debug!(session_id = self.id, error = %e, "frame over the size limit");
                            self.reply_err(None, ErrorCode::TooLarge, "frame over the size limit");
                            let _ = tokio::time::timeout(CLOSE_LINGER, self.write_pending(socket, outbox)).await;
                            return End::Close(close_code::TOO_BIG);
                        }
                        Some(Err(e)) => {
                            debug!(session_id = self.id, error = %e, "connection error");
                            return End::Gone(None);
                        }
                    }
                }
                _ = ping.tick() => {
                    if send_abortable(socket, Message::Ping(Bytes::new()), limits.idle_timeout).await.is_err() {
                        return End::Close(close_code::HEARTBEAT_TIMEOUT);
                    }
                }
                _ = &mut idle => {
                    let deadline = last_heard + limits.idle_timeout;
                    if deadline <= tokio::time::Instant::now() {
                        return End::Close(close_code::HEARTBEAT_TIMEOUT);
                    }
                    idle.as_mut().reset(deadline);
                }
                _ = &mut expiry => return End::Close(close_code::POLICY),
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow() == Phase::Closing {
                        return End::Close(close_code::GOING_AWAY);
                    }
                }
            }
        }
    }

    /// Writes everything queued; `Some` when the session must end.
    async fn write_queued(
        &mut self,
        socket: &mut Socket,
        outbox: &mut Outbox,
        ready_signal: &Notify,
    ) -> Option<End> {
        for _ in 0..MAX_WRITE_ROUNDS {
            let taken = outbox.take();
            let close = taken.close;
            if taken.objects.is_empty() {
                return close.map(End::Close);
            }
            let codec = self.handle.codec;
            if let Err(e) =
                write_objects(socket, codec, taken.objects, self.ctx.limits.idle_timeout).await
            {
                debug!(session_id = self.id, error = %e, "write failed");
                return Some(End::Close(close.unwrap_or(close_code::SLOW_CONSUMER)));
            }
            if let Some(code) = close {
                return Some(End::Close(code));
            }
        }
        // More keeps coming: read once, then come back.
        ready_signal.notify_one();
        None
    }

    /// Best effort: writes what is queued (used just before closing).
    async fn write_pending(&mut self, socket: &mut Socket, outbox: &mut Outbox) {
        let taken = outbox.take();
        let _ = write_objects(socket, self.handle.codec, taken.objects, CLOSE_LINGER).await;
    }

    async fn on_message(&mut self, message: Message) -> Option<End> {
        let codec = self.handle.codec;
        match message {
            Message::Text(text) => {
                if codec != Codec::Json {
                    self.reply_err(
                        None,
                        ErrorCode::BadRequest,
                        "text frame on a msgpack session",
                    );
                    return None;
                }
                self.on_frame(text.as_bytes()).await
            }
            Message::Binary(bytes) => {
                if codec != Codec::Msgpack {
                    self.reply_err(
                        None,
                        ErrorCode::BadRequest,
                        "binary frame on a json session",
                    );
                    return None;
                }
                self.on_frame(&bytes).await
            }
            Message::Close(frame) => Some(End::Gone(frame.map(|f| u16::from(f.code)))),
            // Pongs to our pings (and pings, which tungstenite answers) only
            // prove the client is alive.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
        }
    }

    async fn on_frame(&mut self, payload: &[u8]) -> Option<End> {
        for request in protocol::decode_frame(self.handle.codec, payload) {
            match request {
                Ok(request) => {
                    if let Err(e) = self.on_request(request).await {
                        self.reply_err(e.id, e.code, &e.message);
                    }
                }
                Err(e) => self.reply_err(e.id, e.code, &e.message),
            }
            if self.handle.is_closed() {
                break;
            }
        }
        None
    }

    async fn on_request(&mut self, request: Request) -> Result<(), RequestError> {
        let unavailable =
            |id| RequestError::new(id, ErrorCode::Unavailable, "the node is shutting down");
        match request {
            Request::Ping { id } => {
                self.reply(&Reply::Pong { id });
                Ok(())
            }
            Request::Pub {
                id,
                topic,
                data,
                trace,
                tracestate,
            } => {
                if data.len() > self.ctx.limits.max_message_bytes {
                    return Err(RequestError::new(
                        id,
                        ErrorCode::TooLarge,
                        format!(
                            "message is {} bytes; the limit is {}",
                            data.len(),
                            self.ctx.limits.max_message_bytes
                        ),
                    ));
                }
                if let Some(grants) = &self.grants {
                    if !grants.may_publish(&topic) {
                        return Err(RequestError::new(
                            id,
                            ErrorCode::Forbidden,
                            format!("the token does not allow publishing to {topic}"),
                        ));
                    }
                }
                if self.ctx.stall_topic.as_deref() == Some(topic.as_str()) {
                    // Deliberately blocks this worker thread.
                    std::thread::sleep(Duration::from_secs(1));
                }
                if self.ctx.panic_topic.as_deref() == Some(topic.as_str()) {
                    panic!("fault injection: publish to the configured panic topic");
                }
                let ack = id.map(|id| Ack::Session {
                    session: self.handle.clone(),
                    id,
                });
                let (publish, _ingress) = Publish::from_client(topic, data, trace, tracestate, ack);
                self.ctx
                    .router
                    .publish(publish)
                    .await
                    .map_err(|_| unavailable(id))
            }
            Request::Sub {
                id,
                pattern,
                group,
                since,
                epoch,
            } => {
                if let Some(grants) = &self.grants {
                    if !grants.may_subscribe(&pattern) {
                        return Err(RequestError::new(
                            Some(id),
                            ErrorCode::Forbidden,
                            format!("the token does not allow subscribing to {pattern}"),
                        ));
                    }
                }
                let key = SubKey { pattern, group };
                if !self.subscriptions.contains(&key) {
                    if self.subscriptions.len() >= self.ctx.limits.max_subscriptions {
                        return Err(RequestError::new(
                            Some(id),
                            ErrorCode::LimitExceeded,
                            format!(
                                "at most {} subscriptions per session",
                                self.ctx.limits.max_subscriptions
                            ),
                        ));
                    }
                    self.subscriptions.insert(key.clone());
                    // Counted per session, not per shard: a wildcard lives on every shard.
                    METRICS.subscriptions.inc();
                }
                self.ctx
                    .router
                    .subscribe(self.handle.clone(), id, key, since, epoch)
                    .await
                    .map_err(|_| unavailable(Some(id)))
            }
            Request::Unsub { id, pattern, group } => {
                let key = SubKey { pattern, group };
                if self.subscriptions.remove(&key) {
                    METRICS.subscriptions.dec();
                    self.ctx
                        .router
                        .unsubscribe(self.id, key, Some((self.handle.clone(), id)))
                        .await
                        .map_err(|_| unavailable(Some(id)))
                } else {
                    self.reply(&Reply::Ok(protocol::OkReply {
                        id,
                        ..Default::default()
                    }));
                    Ok(())
                }
            }
        }
    }

    fn reply(&self, reply: &Reply<'_>) {
        self.handle
            .push_reply(self.handle.codec.encode_reply(reply));
    }

    fn reply_err(&self, id: Option<u64>, code: ErrorCode, message: &str) {
        if code != ErrorCode::BadRequest {
            debug!(session_id = self.id, code = %code, message, "request refused");
        }
        self.reply(&Reply::Err { id, code, message });
    }
}

/// When queued messages may wait to be batched: until `write_delay` after
/// the last write, unless what is queued is due now (a reply, a close, a
/// half-full queue). `None`: write now.
fn hold_until(
    outbox: &Outbox,
    last_write: Option<tokio::time::Instant>,
    write_delay: Duration,
) -> Option<tokio::time::Instant> {
    if write_delay.is_zero() {
        return None;
    }
    let due = last_write? + write_delay;
    (due > tokio::time::Instant::now() && !outbox.flush_due()).then_some(due)
}

/// Sends queued objects as few frames as the batch limit allows, with one
/// flush. Fails when the client does not take them within `stall`.
async fn write_objects(
    socket: &mut Socket,
    codec: Codec,
    objects: &mut VecDeque<Bytes>,
    stall: Duration,
) -> Result<(), tungstenite::Error> {
    let objects = objects.make_contiguous();
    let write = async {
        let mut written = 0u64;
        let mut start = 0;
        while start < objects.len() {
            let mut end = start;
            let mut size = 0;
            while end < objects.len()
                && (end == start || size + objects[end].len() <= MAX_BATCH_FRAME)
            {
                size += objects[end].len();
                end += 1;
            }
            let payload = codec.join(&objects[start..end]);
            written += payload.len() as u64;
            let message = match codec {
                Codec::Json => match Utf8Bytes::try_from(payload) {
                    Ok(text) => Message::Text(text),
                    Err(_) => {
                        // Objects are encoded from valid UTF-8; a failure
                        // here is a bug, not the client's doing.
                        warn!("dropping a non-UTF-8 json frame");
                        start = end;
                        continue;
                    }
                },
                Codec::Msgpack => Message::Binary(payload),
            };
            socket.feed(message).await?;
            start = end;
        }
        SinkExt::<Message>::flush(socket).await?;
        METRICS.bytes_out.add(written);
        METRICS.client_writes.inc();
        Ok(())
    };
    // Most writes finish at once: only one that has to wait arms a timer.
    let mut write = std::pin::pin!(write);
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    if let Poll::Ready(result) = first {
        return result;
    }
    match tokio::time::timeout(stall, write).await {
        Ok(result) => result,
        Err(_) => Err(tungstenite::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client is not reading",
        ))),
    }
}

async fn send_abortable(
    socket: &mut Socket,
    message: Message,
    stall: Duration,
) -> Result<(), tungstenite::Error> {
    match tokio::time::timeout(stall, socket.send(message)).await {
        Ok(result) => result,
        Err(_) => Err(tungstenite::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client is not reading",
        ))),
    }
}
