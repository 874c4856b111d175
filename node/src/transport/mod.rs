//! Peer transport: ordered, batched frame delivery between cluster nodes.
//!
//! The cluster logic (router, shards, rebalancing) only sees [`Transport`]:
//! send encoded frames to a node id, receive [`Inbound`] events, and take
//! peers' frames through the [`FrameSink`] it answers each `PeerUp` with.
//! Frames go from each link's own task straight to the sink (the router,
//! which hands them to shards), so no single task carries every node's
//! inbound traffic. Two
//! implementations: [`quic`] (the real one: one QUIC connection per pair of
//! nodes, mutual TLS, one long-lived stream per direction) and [`memory`]
//! (channels, for tests of routing and placement without sockets), the way
//! chitchat offers UDP and channel transports.
//!
//! Guarantees every implementation keeps: frames from one node to another
//! arrive in the order they were sent, or not at all (a connection that
//! breaks loses what was in flight); a peer is reported [`Inbound::PeerUp`]
//! only after it proved its identity (for QUIC: a certificate from the
//! cluster CA and a matching hello), and [`Inbound::PeerDown`] when that
//! connection ends; a link's frames reach the sink only after the cluster
//! answered its `PeerUp`, and all of them before its `PeerDown` is sent.
//!
//! `send` never waits, so shards never block on a peer (two shards waiting
//! on each other's links would deadlock the cluster); a full queue refuses
//! the frame. What keeps queues from filling is [`Backlog`]: client
//! publishes wait while a link is backed up, which slows publishers through
//! their own sockets instead of dropping their messages between nodes.

pub mod memory;
pub mod quic;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::owner::NodeId;

/// A live member the transport should be connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub node: NodeId,
    /// Changes when the node restarts: a connection to an older generation
    /// is replaced.
    pub generation: u64,
    /// The peer's QUIC address.
    pub addr: SocketAddr,
}

/// What the transport tells the cluster.
#[derive(Debug)]
pub enum Inbound {
    /// An authenticated connection to `node` is up. Its frames flow once
    /// the cluster sends the sink to take them on `frames` (after it did
    /// what must come before the first of them); a dropped `frames` means
    /// the node is stopping.
    PeerUp {
        node: NodeId,
        generation: u64,
        frames: oneshot::Sender<SharedSink>,
    },
    /// The connection to `node` ended; frames sent to it since may be lost.
    PeerDown { node: NodeId },
}

/// The future of [`FrameSink::take`].
pub type Taking<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// Takes the frames of a peer, in order, from the task of that peer's link.
pub trait FrameSink: Send + Sync + std::fmt::Debug + 'static {
    /// One encoded [`protocol::peer::PeerFrame`] from `from`; resolves once
    /// it was taken (it waits while the cluster is behind). False once
    /// nothing takes frames any more: the node is stopping.
    fn take<'a>(&'a self, from: &'a NodeId, frame: Bytes) -> Taking<'a>;
}

pub type SharedSink = Arc<dyn FrameSink>;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no connection to node {0}")]
    NotConnected(NodeId),
    #[error("the send queue to node {0} is full")]
    QueueFull(NodeId),
    /// The frame is above [`protocol::peer::MAX_PEER_FRAME_BYTES`]: the
    /// peer would refuse it. Nothing was queued; the connection is intact.
    #[error(
        "a frame of {bytes} bytes to node {to} is above the peer frame limit ({} bytes)",
        protocol::peer::MAX_PEER_FRAME_BYTES
    )]
    TooLarge { to: NodeId, bytes: usize },
}

/// Sends frames to peers. Implementations never block the caller: a frame
/// is queued for the peer's writer, which batches whatever is queued into
/// one write.
pub trait Transport: Send + Sync + 'static {
    /// Queues one encoded frame for `to`. A frame above
    /// [`protocol::peer::MAX_PEER_FRAME_BYTES`] is refused with
    /// [`TransportError::TooLarge`].
    fn send(&self, to: &NodeId, frame: Bytes) -> Result<(), TransportError>;

    /// The members to stay connected to (every live member but this one).
    /// The transport dials, re-dials with backoff, and drops connections to
    /// nodes no longer listed.
    fn set_peers(&self, peers: Vec<PeerAddr>);

    /// Whether any link's send queue is backed up.
    fn backlog(&self) -> &Backlog;
}

/// Client ingress against the node's links to its peers. A publish is
/// admitted once no link is backed up (past a quarter of its queue, until
/// it drains to an eighth), and holds an [`Admission`] until its frames are
/// queued on the links. At most half a queue's worth of publishes are
/// admitted at a time: publishes that found the links clear can pile up in
/// starved shards and reach a link all at once, and a link at its
/// high-water mark still has room for all of them.
#[derive(Debug)]
pub struct Backlog {
    /// Links past their high-water mark.
    congested: AtomicUsize,
    /// Other members that gossip links of theirs past the mark: their
    /// queues hold frames this node's publishers may have caused (a topic's
    /// owner forwards what other nodes' clients publish), so this node's
    /// publishers wait for them too.
    remote: AtomicUsize,
    /// A wait timed out since the last time no link was backed up: a peer
    /// that stopped reading (and is not yet found dead) must cost ingress
    /// one timeout, not one per publish.
    stalled: AtomicBool,
    relieved: Notify,
    /// Whether any of this node's links is backed up changed: the node
    /// gossips it.
    links_changed: Notify,
    /// Places for admitted publishes not yet on the links.
    admissions: Arc<Semaphore>,
}

/// A publish's place among those admitted but not yet on the links; drop
/// it once the publish's frames are queued.
#[derive(Debug)]
pub struct Admission {
    /// Held only to be released on drop.
    _place: Option<OwnedSemaphorePermit>,
}

/// What waiting on a [`Backlog`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// No link was backed up.
    Clear,
    /// A link was backed up and drained within the limit.
    Relieved,
    /// A link was still backed up when the limit passed.
    TimedOut,
}

impl Backlog {
    /// For links of `queue_frames` frames each.
    pub fn new(queue_frames: usize) -> Backlog {
        Backlog {
            congested: AtomicUsize::new(0),
            remote: AtomicUsize::new(0),
            stalled: AtomicBool::new(false),
            relieved: Notify::new(),
            links_changed: Notify::new(),
            admissions: Arc::new(Semaphore::new((queue_frames / 2).max(1))),
        }
    }

    /// Admits one client publish: waits as [`Backlog::wait_clear`] does,
    /// then for a place among the admitted publishes (shards free places as
    /// they run, and never wait themselves, so this always ends).
    pub async fn admit(&self, limit: Duration) -> (Waited, Admission) {
        let waited = self.wait_clear(limit).await;
        // The semaphore is never closed: `None` cannot happen.
        let place = self.admissions.clone().acquire_owned().await.ok();
        (waited, Admission { _place: place })
    }

    /// A link of this node or of another member is backed up: client
    /// publishes wait.
    pub fn is_congested(&self) -> bool {
        self.links_congested() || self.remote.load(Ordering::Acquire) > 0
    }

    /// A link of this node is backed up: what it gossips to the others
    /// (never what it heard from them, or two nodes would keep each other
    /// congested).
    pub fn links_congested(&self) -> bool {
        self.congested.load(Ordering::Acquire) > 0
    }

    /// Returns once [`Backlog::links_congested`] may have changed since the
    /// last call (one waiter: the node's gossip).
    pub async fn links_changed(&self) {
        self.links_changed.notified().await;
    }

    /// How many other members gossip backed-up links.
    pub fn set_remote_congested(&self, members: usize) {
        let before = self.remote.swap(members, Ordering::AcqRel);
        if members == 0 && before > 0 {
            if !self.links_congested() {
                self.stalled.store(false, Ordering::Release);
            }
            self.relieved.notify_waiters();
        }
    }

    /// Waits, for at most `limit`, until no link is backed up. Once a wait
    /// timed out, the next ones do not wait until every link drained.
    pub async fn wait_clear(&self, limit: Duration) -> Waited {
        if !self.is_congested() {
            return Waited::Clear;
        }
        if self.stalled.load(Ordering::Acquire) {
            return Waited::TimedOut;
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let relieved = self.relieved.notified();
            tokio::pin!(relieved);
            // Registered before the check, so a release in between is seen.
            relieved.as_mut().enable();
            if !self.is_congested() {
                return Waited::Relieved;
            }
            if tokio::time::timeout_at(deadline, relieved).await.is_err() {
                self.stalled.store(true, Ordering::Release);
                // Released in between: the flag must not outlive it.
                if !self.is_congested() {
                    self.stalled.store(false, Ordering::Release);
                }
                return Waited::TimedOut;
            }
        }
    }
}

/// One link's send queue as its node's [`Backlog`] sees it. Dropping it
/// (the link ended) releases its part of the backlog.
#[derive(Debug)]
pub struct LinkBacklog {
    backlog: Arc<Backlog>,
    congested: AtomicBool,
    high: usize,
    low: usize,
}

impl LinkBacklog {
    /// For a queue of `capacity` frames.
    pub fn new(backlog: Arc<Backlog>, capacity: usize) -> LinkBacklog {
        let high = (capacity / 4).max(1);
        LinkBacklog {
            backlog,
            congested: AtomicBool::new(false),
            high,
            low: high / 2,
        }
    }

    /// After a frame was queued: `queued` frames wait now.
    pub fn queued(&self, queued: usize) {
        if queued >= self.high
            && !self.congested.swap(true, Ordering::AcqRel)
            && self.backlog.congested.fetch_add(1, Ordering::AcqRel) == 0
        {
            self.backlog.links_changed.notify_one();
        }
    }

    /// After the link's writer took frames: `queued` frames are left.
    pub fn drained(&self, queued: usize) {
        if queued <= self.low {
            self.release();
        }
    }

    fn release(&self) {
        // A load first: the writer calls this after every batch, and the
        // link is almost never backed up.
        if self.congested.load(Ordering::Acquire) && self.congested.swap(false, Ordering::AcqRel) {
            if self.backlog.congested.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.backlog.links_changed.notify_one();
                if self.backlog.remote.load(Ordering::Acquire) == 0 {
                    self.backlog.stalled.store(false, Ordering::Release);
                }
            }
            self.backlog.relieved.notify_waiters();
        }
    }
}

impl Drop for LinkBacklog {
    fn drop(&mut self) {
        self.release();
    }
}

pub type SharedTransport = Arc<dyn Transport>;

/// For transport tests: the events of one node as one ordered stream, with
/// frames in it, the way the transport hands them over. The stream holds
/// at most 1,024 events: a test that stops reading it stops the links.
#[cfg(test)]
pub mod testing {
    use super::*;
    use tokio::sync::mpsc;

    #[derive(Debug)]
    pub enum Event {
        PeerUp { node: NodeId, generation: u64 },
        PeerDown { node: NodeId },
        Frame { from: NodeId, frame: Bytes },
    }

    /// Puts a link's frames into the event stream.
    #[derive(Debug)]
    struct ChannelSink(mpsc::Sender<Event>);

    impl FrameSink for ChannelSink {
        fn take<'a>(&'a self, from: &'a NodeId, frame: Bytes) -> Taking<'a> {
            Box::pin(async move {
                let from = from.clone();
                self.0.send(Event::Frame { from, frame }).await.is_ok()
            })
        }
    }

    /// Answers every `PeerUp` with a sink feeding the returned stream, after
    /// putting the `PeerUp` in it.
    pub fn events(mut inbound: mpsc::Receiver<Inbound>) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(event) = inbound.recv().await {
                let event = match event {
                    Inbound::PeerUp {
                        node,
                        generation,
                        frames,
                    } => {
                        if tx.send(Event::PeerUp { node, generation }).await.is_err() {
                            return;
                        }
                        let _ = frames.send(Arc::new(ChannelSink(tx.clone())));
                        continue;
                    }
                    Inbound::PeerDown { node } => Event::PeerDown { node },
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_link_is_backed_up_past_a_quarter_until_it_drains_to_an_eighth() {
        let backlog = Arc::new(Backlog::new(64));
        let link = LinkBacklog::new(backlog.clone(), 64);
        link.queued(15);
        assert!(!backlog.is_congested());
        link.queued(16);
        assert!(backlog.is_congested());
        link.queued(40);
        link.drained(9);
        assert!(backlog.is_congested(), "above the low-water mark");
        link.drained(8);
        assert!(!backlog.is_congested());
        link.drained(0);
        assert_eq!(backlog.congested.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn every_backed_up_link_must_drain_and_an_ended_link_releases() {
        let backlog = Arc::new(Backlog::new(64));
        let a = LinkBacklog::new(backlog.clone(), 64);
        let b = LinkBacklog::new(backlog.clone(), 64);
        a.queued(20);
        b.queued(20);
        a.drained(0);
        assert!(backlog.is_congested(), "b is still backed up");
        drop(b);
        assert!(!backlog.is_congested());
        assert_eq!(
            backlog.wait_clear(Duration::from_secs(5)).await,
            Waited::Clear
        );
    }

    #[tokio::test]
    async fn waiting_ends_when_the_link_drains_or_the_limit_passes() {
        let backlog = Arc::new(Backlog::new(64));
        let link = Arc::new(LinkBacklog::new(backlog.clone(), 64));
        link.queued(64);
        assert_eq!(
            backlog.wait_clear(Duration::from_millis(50)).await,
            Waited::TimedOut
        );
        // Stalled: the next publish does not wait again.
        let before = tokio::time::Instant::now();
        assert_eq!(
            backlog.wait_clear(Duration::from_secs(10)).await,
            Waited::TimedOut
        );
        assert!(before.elapsed() < Duration::from_secs(5));
        // Drained and backed up again: waiting resumes.
        link.drained(0);
        link.queued(64);
        let link = link.clone();
        relieved_by(&backlog, move || link.drained(3)).await;
    }

    /// Waits on `backlog` while `relief` runs 20 ms later: the wait must
    /// end relieved.
    async fn relieved_by(backlog: &Backlog, relief: impl FnOnce() + Send + 'static) {
        let relieving = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            relief();
        });
        assert_eq!(
            backlog.wait_clear(Duration::from_secs(5)).await,
            Waited::Relieved
        );
        relieving.await.expect("relief");
    }

    #[tokio::test]
    async fn the_gossip_hears_when_the_links_back_up_and_when_they_clear() {
        let backlog = Arc::new(Backlog::new(64));
        let heard = || tokio::time::timeout(Duration::from_millis(50), backlog.links_changed());
        let link = LinkBacklog::new(backlog.clone(), 64);
        link.queued(16);
        assert!(heard().await.is_ok() && backlog.links_congested());
        link.queued(40);
        assert!(heard().await.is_err(), "still backed up: nothing to tell");
        link.drained(0);
        assert!(heard().await.is_ok() && !backlog.links_congested());
    }

    #[tokio::test]
    async fn another_members_backed_up_links_hold_publishes_but_are_not_gossiped_on() {
        let backlog = Arc::new(Backlog::new(64));
        backlog.set_remote_congested(1);
        assert!(backlog.is_congested());
        assert!(
            !backlog.links_congested(),
            "only this node's links are gossiped"
        );
        let clearer = backlog.clone();
        relieved_by(&backlog, move || clearer.set_remote_congested(0)).await;
        // A timed-out wait stalls until both this node's links and the
        // other members' have drained.
        let link = LinkBacklog::new(backlog.clone(), 64);
        link.queued(64);
        backlog.set_remote_congested(2);
        assert_eq!(
            backlog.wait_clear(Duration::from_millis(20)).await,
            Waited::TimedOut
        );
        link.drained(0);
        assert_eq!(
            backlog.wait_clear(Duration::from_secs(10)).await,
            Waited::TimedOut,
            "still stalled: the others are backed up"
        );
        backlog.set_remote_congested(0);
        assert_eq!(
            backlog.wait_clear(Duration::from_secs(5)).await,
            Waited::Clear
        );
    }
}
