//! A session's outbound queue: what the node has to send to one client.
//!
//! Shards push encoded objects without ever waiting; the session's writer
//! takes everything queued at once and sends it as one frame. A push onto a
//! full queue marks the session a slow consumer and asks it to close with
//! 4001. The queue holds no memory while empty, which keeps idle sessions
//! small.
//!
//! The queue also says when waiting would not pay: a reply (`ok`, `pong`,
//! `err`) or a close is queued, or the queue is half full. A writer that
//! holds messages back to batch them (`client.write_delay`) writes at once
//! then, so replies are never delayed and batching never makes a slow
//! consumer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use protocol::Codec;
use tokio::sync::Notify;

use crate::metrics::METRICS;

/// Process-unique id of a client session.
pub type SessionId = u64;

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

pub fn next_session_id() -> SessionId {
    NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed)
}

/// WebSocket close codes the node uses.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const SLOW_CONSUMER: u16 = 4001;
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
}

/// A queue holding this much is written at once even when the writer
/// batches: one frame's worth gains nothing from waiting.
pub const FULL_BATCH_BYTES: usize = 256 * 1024;

/// What happened to a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The session is gone or closing; the push was dropped.
    Closed,
    /// The queue was full: the session is now closing with 4001.
    SlowConsumer,
}

/// Writers to wake once a shard has handed out a run of messages.
///
/// A shard takes commands in batches; waking a session's writer for each
/// message let an idle worker thread write that one message while the
/// shard was still queueing the next ones for the same session (1.3
/// messages per write in a saturated fan-out). Waking every session once
/// after the batch writes each the whole run, at the cost of the batch's
/// handling time, which is only long when the node is busy.
#[derive(Debug, Default)]
pub struct Wakes {
    sessions: Vec<Arc<Notify>>,
}

impl Wakes {
    /// Wakes every writer a deferred push asked for.
    pub fn wake_all(&mut self) {
        for ready in self.sessions.drain(..) {
            ready.notify_one();
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Bytes>,
    bytes: usize,
    close: Option<u16>,
    writer_gone: bool,
    /// Something queued should be written without waiting for more.
    flush_now: bool,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer: something was queued or a close was asked for.
    ready: Arc<Notify>,
    max_items: usize,
    max_bytes: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue
        // inconsistent (every update is a single push or swap).
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The sending side, cloned into every subscription of the session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: SessionId,
    pub codec: Codec,
    shared: Arc<Shared>,
}

/// The receiving side, owned by the session's writer.
#[derive(Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
    spare: VecDeque<Bytes>,
}

/// Creates a session's queue.
pub fn outbox(
    id: SessionId,
    codec: Codec,
    max_items: usize,
    max_bytes: usize,
) -> (SessionHandle, Outbox) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        ready: Arc::new(Notify::new()),
        max_items,
        max_bytes,
    });
    (
        SessionHandle {
            id,
            codec,
            shared: shared.clone(),
        },
        Outbox {
            shared,
            spare: VecDeque::new(),
        },
    )
}

impl SessionHandle {
    /// Queues an encoded message for the client; the writer may hold it
    /// back for `client.write_delay` to batch it with the next ones.
    pub fn push(&self, object: Bytes) -> Pushed {
        self.wake_now(self.enqueue(object, false))
    }

    /// Queues a reply to one of the client's requests: the writer sends it
    /// (and everything queued before it) without waiting.
    pub fn push_reply(&self, object: Bytes) -> Pushed {
        self.wake_now(self.enqueue(object, true))
    }

    fn wake_now(&self, (pushed, wake): (Pushed, bool)) -> Pushed {
        if wake {
            self.shared.ready.notify_one();
        }
        pushed
    }

    /// Queues a message like [`push`](Self::push), but leaves waking the
    /// writer to `wakes`, so that a shard handing out a run of messages
    /// wakes each session once for all of them (see [`Wakes`]).
    pub fn push_deferred(&self, object: Bytes, wakes: &mut Wakes) -> Pushed {
        let (pushed, wake) = self.enqueue(object, false);
        if wake {
            wakes.sessions.push(self.shared.ready.clone());
        }
        pushed
    }

    /// Queues `object`; says whether the writer must be woken for it.
    fn enqueue(&self, object: Bytes, urgent: bool) -> (Pushed, bool) {
        let mut queue = self.shared.lock();
        if queue.close.is_some() || queue.writer_gone {
            return (Pushed::Closed, false);
        }
        let len = object.len();
        // An empty queue takes one item of any size, so a single large
        // message is never a slow consumer by itself.
        let over = !queue.items.is_empty()
            && (queue.items.len() >= self.shared.max_items
                || queue.bytes + len > self.shared.max_bytes);
        if over {
            queue.close = Some(close_code::SLOW_CONSUMER);
            drop(queue);
            METRICS.slow_consumers.inc();
            return (Pushed::SlowConsumer, true);
        }
        let was_empty = queue.items.is_empty();
        queue.items.push_back(object);
        queue.bytes += len;
        let becomes_due = !queue.flush_now
            && (urgent
                || queue.items.len() * 2 >= self.shared.max_items
                || queue.bytes * 2 >= self.shared.max_bytes
                || queue.bytes >= FULL_BATCH_BYTES);
        queue.flush_now |= becomes_due;
        // Only the push that makes the queue non-empty, or makes it due,
        // wakes the writer: the writer takes everything under the same
        // lock, so a later push either joins what it will take or finds
        // the queue empty again and wakes it. `Notify` keeps the permit if
        // the writer is not waiting yet. (Notifying on every push was 3% of
        // a fan-out node's CPU.)
        (Pushed::Queued, was_empty || becomes_due)
    }

    /// Asks the session to close with `code` (the first request wins).
    pub fn close(&self, code: u16) {
        let mut queue = self.shared.lock();
        if queue.close.is_none() {
            queue.close = Some(code);
            drop(queue);
            self.shared.ready.notify_one();
        }
    }

    /// True once the session has ended or is closing.
    pub fn is_closed(&self) -> bool {
        let queue = self.shared.lock();
        queue.close.is_some() || queue.writer_gone
    }

    pub fn same_session(&self, other: &SessionHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// What the writer took from the queue.
pub struct Taken<'a> {
    pub objects: &'a mut VecDeque<Bytes>,
    pub close: Option<u16>,
}

impl Outbox {
    /// The writer's wake-up: notified whenever something is queued or a
    /// close is asked for.
    pub fn ready_signal(&self) -> Arc<Notify> {
        self.shared.ready.clone()
    }

    /// Takes everything queued, in order, plus any close request. The
    /// objects stay borrowed so their buffer is reused for the next batch.
    pub fn take(&mut self) -> Taken<'_> {
        self.spare.clear();
        let mut queue = self.shared.lock();
        std::mem::swap(&mut queue.items, &mut self.spare);
        queue.bytes = 0;
        queue.flush_now = false;
        let close = queue.close;
        drop(queue);
        // Keep a buffer that a burst grew only while it is in use.
        if self.spare.is_empty() && self.spare.capacity() > 64 {
            self.spare = VecDeque::new();
        }
        Taken {
            objects: &mut self.spare,
            close,
        }
    }

    /// Asks for a close from the session itself (the first request wins).
    pub fn close(&self, code: u16) {
        let mut queue = self.shared.lock();
        if queue.close.is_none() {
            queue.close = Some(code);
        }
    }

    /// True when what is queued should be written without waiting: a
    /// reply or a close is queued, or the queue is half full.
    pub fn flush_due(&self) -> bool {
        let queue = self.shared.lock();
        queue.flush_now || queue.close.is_some()
    }

    pub fn close_requested(&self) -> Option<u16> {
        self.shared.lock().close
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.writer_gone = true;
        queue.items.clear();
        queue.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_is_a_slow_consumer_once() {
        let (handle, mut outbox) = outbox(1, Codec::Json, 2, 1 << 20);
        assert_eq!(handle.push(Bytes::from_static(b"a")), Pushed::Queued);
        assert_eq!(handle.push(Bytes::from_static(b"b")), Pushed::Queued);
        assert_eq!(handle.push(Bytes::from_static(b"c")), Pushed::SlowConsumer);
        assert_eq!(handle.push(Bytes::from_static(b"d")), Pushed::Closed);
        let taken = outbox.take();
        assert_eq!(taken.objects.len(), 2);
        assert_eq!(taken.close, Some(close_code::SLOW_CONSUMER));
    }

    #[test]
    fn byte_limit_allows_one_large_item() {
        let (handle, mut outbox) = outbox(1, Codec::Json, 100, 4);
        assert_eq!(
            handle.push(Bytes::from_static(b"0123456789")),
            Pushed::Queued
        );
        assert_eq!(handle.push(Bytes::from_static(b"x")), Pushed::SlowConsumer);
        assert_eq!(outbox.take().objects.len(), 1);
    }

    #[test]
    fn replies_and_a_half_full_queue_are_due_at_once() {
        let (handle, mut outbox) = outbox(1, Codec::Json, 8, 1 << 20);
        assert_eq!(handle.push(Bytes::from_static(b"m")), Pushed::Queued);
        assert!(!outbox.flush_due(), "one message may wait");
        assert_eq!(handle.push_reply(Bytes::from_static(b"r")), Pushed::Queued);
        assert!(outbox.flush_due(), "a reply is due");
        assert_eq!(outbox.take().objects.len(), 2);
        assert!(!outbox.flush_due(), "taking clears it");
        for _ in 0..3 {
            handle.push(Bytes::from_static(b"m"));
        }
        assert!(!outbox.flush_due(), "3 of 8 may wait");
        handle.push(Bytes::from_static(b"m"));
        assert!(outbox.flush_due(), "4 of 8 is half full");
        outbox.take();
        handle.push(Bytes::from(vec![b'x'; FULL_BATCH_BYTES]));
        assert!(outbox.flush_due(), "a full frame's worth is due");
        outbox.take();
        handle.push(Bytes::from_static(b"m"));
        handle.close(close_code::GOING_AWAY);
        assert!(outbox.flush_due(), "a close is due");
    }

    #[test]
    fn pushes_after_the_writer_is_gone_are_dropped() {
        let (handle, outbox) = outbox(1, Codec::Json, 2, 100);
        drop(outbox);
        assert_eq!(handle.push(Bytes::from_static(b"a")), Pushed::Closed);
        assert!(handle.is_closed());
    }

    /// The writer's loop as the session runs it: wait, take everything,
    /// repeat. Pushes from another thread, some while the writer is busy
    /// and some while it waits, must all arrive: a push that finds the
    /// queue non-empty does not notify, so this checks that no wake-up is
    /// lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_is_woken_for_every_push() {
        const PUSHES: usize = 20_000;
        let (handle, mut outbox) = outbox(1, Codec::Json, PUSHES, 1 << 30);
        let ready = outbox.ready_signal();
        let pusher = tokio::spawn(async move {
            for i in 0..PUSHES {
                assert_eq!(handle.push(Bytes::from(i.to_string())), Pushed::Queued);
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut received = 0;
        let collect = async {
            while received < PUSHES {
                ready.notified().await;
                for object in outbox.take().objects.drain(..) {
                    assert_eq!(object, Bytes::from(received.to_string()));
                    received += 1;
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), collect)
            .await
            .expect("the writer was not woken for queued objects");
        pusher.await.expect("pusher");
    }
}
