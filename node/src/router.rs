//! The router: how sessions, the HTTP API and peers reach the shards.
//!
//! It is a cheap, cloneable handle. A topic belongs to one shard (by hash);
//! a wildcard subscription is placed on every shard (and, in a cluster,
//! announced to every member by shard 0), and its `ok` is sent when the
//! last part has it. Frames from peers are dispatched here too, to the shard
//! of their topic or, for answers, to the shard that asked.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::peer::{self, PeerFrame};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::metrics::METRICS;
use crate::outbox::{SessionHandle, SessionId};
use crate::owner::{NodeId, OwnerLimits, SubKey};
use crate::ring::Placement;
use crate::shard::{
    Command, Completion, InterestLatch, Publish, Shard, ShardSetup, MAX_SHARDS, SHARD_BITS,
};
use crate::transport::{FrameSink, SharedTransport, Taking, Waited};

/// Commands a shard may have queued before senders wait.
const SHARD_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("the node is shutting down")]
    Stopped,
}

/// What the router's shards need to start.
pub struct RouterSetup {
    pub node: NodeId,
    pub shards: usize,
    pub limits: OwnerLimits,
    /// `None` for a single node.
    pub transport: Option<SharedTransport>,
    pub request_timeout: Duration,
}

#[derive(Clone)]
pub struct Router {
    shards: Arc<[mpsc::Sender<Command>]>,
    transport: Option<SharedTransport>,
    /// How long a client publish waits for a backed-up link.
    backlog_wait: Duration,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("shards", &self.shards.len())
            .field("clustered", &self.transport.is_some())
            .finish()
    }
}

impl Router {
    /// Starts the shard tasks on the current runtime. A clustered node
    /// starts with an empty placement (it owns nothing until it joins); a
    /// single node owns everything.
    pub fn start(setup: RouterSetup) -> Router {
        let count = setup.shards.clamp(1, MAX_SHARDS);
        let placement = Arc::new(match setup.transport {
            Some(_) => Placement::new(Vec::new(), 1, 0),
            None => Placement::new([setup.node.clone()], 1, 0),
        });
        let shards: Vec<mpsc::Sender<Command>> = (0..count)
            .map(|index| {
                let (tx, rx) = mpsc::channel(SHARD_QUEUE);
                let shard_setup = ShardSetup {
                    node: setup.node.clone(),
                    index,
                    limits: setup.limits.clone(),
                    transport: setup.transport.clone(),
                    placement: placement.clone(),
                    request_timeout: setup.request_timeout,
                };
                tokio::spawn(Shard::new(shard_setup, rx).run());
                tx
            })
            .collect();
        Router {
            shards: shards.into(),
            transport: setup.transport,
            backlog_wait: setup.request_timeout,
        }
    }

    fn shard_of(&self, topic: &str) -> &mpsc::Sender<Command> {
        // DefaultHasher::new() has fixed keys: placement is stable.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        topic.hash(&mut hasher);
        &self.shards[(hasher.finish() % self.shards.len() as u64) as usize]
    }

    fn shard_of_req(&self, req: u64) -> Option<&mpsc::Sender<Command>> {
        self.shards.get((req & ((1 << SHARD_BITS) - 1)) as usize)
    }

    async fn send(
        &self,
        shard: &mpsc::Sender<Command>,
        command: Command,
    ) -> Result<(), RouterError> {
        shard.send(command).await.map_err(|_| RouterError::Stopped)
    }

    async fn to_all(&self, make: impl Fn() -> Command) -> Result<(), RouterError> {
        for shard in self.shards.iter() {
            self.send(shard, make()).await?;
        }
        Ok(())
    }

    /// A client's publish. While a link to another node is backed up it
    /// waits (up to the request timeout) before it goes on: the client is
    /// slowed through its own socket instead of its messages being dropped
    /// at a full link. Shards never wait on links, so this cannot deadlock.
    /// Publishes admitted but not yet on the links are bounded too (see
    /// [`crate::transport::Backlog`]).
    pub async fn publish(&self, publish: Publish) -> Result<(), RouterError> {
        let admission = match &self.transport {
            Some(transport) => {
                let (waited, admission) = transport.backlog().admit(self.backlog_wait).await;
                match waited {
                    Waited::Clear => {}
                    Waited::Relieved => METRICS.publish_backlog_waits.inc(),
                    Waited::TimedOut => {
                        METRICS.publish_backlog_waits.inc();
                        METRICS.publish_backlog_timeouts.inc();
                    }
                }
                Some(admission)
            }
            None => None,
        };
        let shard = self.shard_of(publish.topic.as_str());
        self.send(shard, Command::Publish(publish, admission)).await
    }

    /// Parts of a wildcard (un)subscription: every shard, plus the
    /// announcement to the other members in a cluster.
    fn wildcard_parts(&self) -> usize {
        self.shards.len() + usize::from(self.transport.is_some())
    }

    /// Subscribes a session; the session gets its `ok` (and any replay)
    /// through its outbox.
    pub async fn subscribe(
        &self,
        session: SessionHandle,
        id: u64,
        key: SubKey,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Result<(), RouterError> {
        if key.pattern.is_wildcard() {
            let recovered = since.map(|_| false);
            let done = Completion::new(self.wildcard_parts(), session.clone(), id, recovered);
            self.to_all(|| Command::Subscribe {
                session: session.clone(),
                key: key.clone(),
                since,
                epoch: epoch.clone(),
                done: done.clone(),
            })
            .await?;
            if self.transport.is_some() {
                let announce = Command::Announce {
                    key,
                    present: true,
                    done: Some(done),
                };
                self.send(&self.shards[0], announce).await?;
            }
            Ok(())
        } else {
            let done = Completion::new(1, session.clone(), id, None);
            let shard = self.shard_of(key.pattern.as_str());
            let command = Command::Subscribe {
                session,
                key,
                since,
                epoch,
                done,
            };
            self.send(shard, command).await
        }
    }

    /// Unsubscribes; with `reply`, the session gets `ok` once no shard will
    /// deliver on that subscription any more.
    pub async fn unsubscribe(
        &self,
        session: SessionId,
        key: SubKey,
        reply: Option<(SessionHandle, u64)>,
    ) -> Result<(), RouterError> {
        if key.pattern.is_wildcard() {
            let done =
                reply.map(|(handle, id)| Completion::new(self.wildcard_parts(), handle, id, None));
            self.to_all(|| Command::Unsubscribe {
                session,
                key: key.clone(),
                done: done.clone(),
            })
            .await?;
            if self.transport.is_some() {
                // After shard 0 ran the unsubscribe: it knows whether
                // another session here still holds the pattern.
                let announce = Command::Announce {
                    key,
                    present: false,
                    done,
                };
                self.send(&self.shards[0], announce).await?;
            }
            Ok(())
        } else {
            let done = reply.map(|(handle, id)| Completion::new(1, handle, id, None));
            let shard = self.shard_of(key.pattern.as_str());
            self.send(shard, Command::Unsubscribe { session, key, done })
                .await
        }
    }

    /// Removes every subscription of a session that has ended.
    pub async fn forget_session(&self, session: SessionId, keys: Vec<SubKey>) {
        for key in keys {
            if self.unsubscribe(session, key, None).await.is_err() {
                return;
            }
        }
    }

    /// A new placement for every shard.
    pub async fn set_placement(&self, placement: Arc<Placement>) -> Result<(), RouterError> {
        self.to_all(|| Command::Placement(placement.clone())).await
    }

    pub async fn peer_up(&self, node: NodeId, reconnect: bool) -> Result<(), RouterError> {
        self.to_all(|| Command::PeerUp {
            node: node.clone(),
            reconnect,
        })
        .await
    }

    pub async fn peer_down(&self, node: NodeId) -> Result<(), RouterError> {
        self.to_all(|| Command::PeerDown(node.clone())).await
    }

    /// Hands a peer's frame to the shard it concerns. Order is kept per
    /// shard, which is all that matters: one topic lives on one shard.
    pub async fn dispatch(&self, from: NodeId, frame: PeerFrame) -> Result<(), RouterError> {
        let shard = match &frame {
            PeerFrame::Publish { topic, .. } | PeerFrame::Deliver { topic, .. } => {
                self.shard_of(topic.as_str())
            }
            PeerFrame::Subscribe { key, .. } => self.shard_of(key.pattern.as_str()),
            PeerFrame::Interest { key, req, present } => {
                if key.pattern.is_wildcard() {
                    let latch = match (req, &self.transport) {
                        (Some(req), Some(transport)) => Some(InterestLatch::new(
                            self.shards.len(),
                            from.clone(),
                            *req,
                            transport.clone(),
                        )),
                        _ => None,
                    };
                    let (key, present) = (key.clone(), *present);
                    return self
                        .to_all(|| Command::RemoteWildcard {
                            from: from.clone(),
                            key: key.clone(),
                            present,
                            latch: latch.clone(),
                        })
                        .await;
                }
                self.shard_of(key.pattern.as_str())
            }
            PeerFrame::Published { req, .. }
            | PeerFrame::Refused { req, .. }
            | PeerFrame::Subscribed { req, .. }
            | PeerFrame::InterestAck { req } => match self.shard_of_req(*req) {
                Some(shard) => shard,
                None => return Ok(()),
            },
        };
        self.send(shard, Command::Remote { from, frame }).await
    }

    /// The entries of each [`crate::metrics::Table`], summed over the
    /// shards, as they are now (`herald_table_entries` lags by up to a
    /// second).
    pub async fn table_entries(&self) -> Result<[usize; 3], RouterError> {
        let mut sum = [0; 3];
        for shard in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            self.send(shard, Command::Tables(tx)).await?;
            let entries = rx.await.map_err(|_| RouterError::Stopped)?;
            for (total, n) in sum.iter_mut().zip(entries) {
                *total += n;
            }
        }
        Ok(sum)
    }

    /// True when every shard answers within `timeout`.
    pub async fn healthy(&self, timeout: Duration) -> bool {
        let checks = self.shards.iter().map(|shard| async move {
            let (tx, rx) = oneshot::channel();
            shard.send(Command::Health(tx)).await.is_ok() && rx.await.is_ok()
        });
        let all = futures_util::future::join_all(checks);
        matches!(tokio::time::timeout(timeout, all).await, Ok(results) if results.iter().all(|ok| *ok))
    }
}

/// Peers' frames go from each link's task straight to the shard they
/// concern, decoded there: no one task carries every link's traffic.
impl FrameSink for Router {
    fn take<'a>(&'a self, from: &'a NodeId, frame: Bytes) -> Taking<'a> {
        Box::pin(async move {
            match peer::decode::<PeerFrame>(&frame) {
                Ok(frame) => self.dispatch(from.clone(), frame).await.is_ok(),
                Err(e) => {
                    warn!(peer = %from, error = %e, "undecodable frame from a peer dropped");
                    true
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use protocol::{Data, Topic};

    use super::*;
    use crate::transport::{Backlog, LinkBacklog, PeerAddr, TransportError};

    const LINK_FRAMES: usize = 256;

    /// One link of `LINK_FRAMES` frames to node "b", counting what a full
    /// queue refused.
    struct OneLink {
        queue: mpsc::Sender<Bytes>,
        link: Arc<LinkBacklog>,
        backlog: Arc<Backlog>,
        refused: AtomicUsize,
    }

    impl crate::transport::Transport for OneLink {
        fn send(&self, to: &NodeId, frame: Bytes) -> Result<(), TransportError> {
            if self.queue.try_send(frame).is_err() {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(TransportError::QueueFull(to.clone()));
            }
            self.link
                .queued(self.queue.max_capacity() - self.queue.capacity());
            Ok(())
        }

        fn set_peers(&self, _peers: Vec<PeerAddr>) {}

        fn backlog(&self) -> &Backlog {
            &self.backlog
        }
    }

    /// On one thread the publisher runs until it has to wait, so the shard
    /// is as starved as it can be: without a bound on admitted publishes,
    /// a shard queue's worth (4,096) would reach the 256-frame link at once.
    #[tokio::test(flavor = "current_thread")]
    async fn a_starved_shard_cannot_overrun_a_link() {
        const PUBLISHES: usize = 5000;
        let backlog = Arc::new(Backlog::new(LINK_FRAMES));
        let (queue, mut peer) = mpsc::channel(LINK_FRAMES);
        let link = Arc::new(LinkBacklog::new(backlog.clone(), LINK_FRAMES));
        let transport = Arc::new(OneLink {
            queue,
            link: link.clone(),
            backlog,
            refused: AtomicUsize::new(0),
        });
        let router = Router::start(RouterSetup {
            node: "a".into(),
            shards: 1,
            limits: OwnerLimits {
                history_messages: 10,
                history_age: Duration::from_secs(60),
                history_bytes: None,
            },
            transport: Some(transport.clone()),
            request_timeout: Duration::from_secs(30),
        });
        router
            .set_placement(Arc::new(Placement::new(["b".into()], 1, 1)))
            .await
            .expect("placement");
        // The peer reads one frame per turn of the runtime.
        let read = Arc::new(AtomicUsize::new(0));
        let reading = read.clone();
        tokio::spawn(async move {
            while peer.recv().await.is_some() {
                reading.fetch_add(1, Ordering::Relaxed);
                link.drained(peer.len());
                tokio::task::yield_now().await;
            }
        });
        // Unconstrained: tokio's cooperative budget would otherwise make the
        // publisher yield every 128 sends, which a busy multi-threaded node
        // does not guarantee.
        tokio::task::unconstrained(async {
            for n in 0..PUBLISHES {
                let publish = Publish {
                    topic: Topic::parse("flood.t").expect("topic"),
                    data: Data::Json(Bytes::from(n.to_string())),
                    trace: None,
                    tracestate: None,
                    ack: None,
                };
                router.publish(publish).await.expect("publish");
            }
        })
        .await;
        let settled = async {
            while read.load(Ordering::Relaxed) + transport.refused.load(Ordering::Relaxed)
                < PUBLISHES
            {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), settled)
            .await
            .expect("every frame was read or refused");
        assert_eq!(
            transport.refused.load(Ordering::Relaxed),
            0,
            "frames refused by the full link"
        );
    }
}
