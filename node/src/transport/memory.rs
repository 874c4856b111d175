//! In-memory transport: nodes in one process joined by channels, so routing,
//! placement and rebalancing are tested without sockets.
//!
//! A [`MemoryNetwork`] is the wire: nodes register on it, and a frame sent
//! from A to B is handed to B's inbound channel in order. Links can be cut
//! and healed to play a partition; a cut reports `PeerDown` on both sides,
//! as a broken QUIC connection would.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Backlog, Inbound, LinkBacklog, PeerAddr, Transport, TransportError};
use crate::owner::NodeId;

/// Frames queued per direction before `send` reports `QueueFull`.
const LINK_QUEUE: usize = 65_536;

#[derive(Default)]
struct Wire {
    /// Registered nodes: their generation and their inbound channel.
    nodes: HashMap<NodeId, (u64, mpsc::Sender<Inbound>)>,
    /// Each node's view of its links' queues.
    backlogs: HashMap<NodeId, Arc<Backlog>>,
    /// Who each node wants to be connected to (from `set_peers`).
    wanted: HashMap<NodeId, HashSet<NodeId>>,
    /// Live links, by ordered pair (low, high).
    links: HashSet<(NodeId, NodeId)>,
    /// Pairs that may not connect (a partition).
    cut: HashSet<(NodeId, NodeId)>,
    /// One ordered queue per direction of each link.
    senders: HashMap<(NodeId, NodeId), (mpsc::Sender<Bytes>, Arc<LinkBacklog>)>,
}

fn pair(a: &NodeId, b: &NodeId) -> (NodeId, NodeId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

/// The shared wire between in-memory nodes.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    wire: Arc<Mutex<Wire>>,
}

impl MemoryNetwork {
    pub fn new() -> MemoryNetwork {
        MemoryNetwork::default()
    }

    fn lock(&self) -> MutexGuard<'_, Wire> {
        // A panic while holding the lock leaves the wire consistent enough
        // for a test to report it; take the data anyway.
        self.wire.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches a node; its events arrive on `inbound`.
    pub fn join(
        &self,
        node: NodeId,
        generation: u64,
        inbound: mpsc::Sender<Inbound>,
    ) -> MemoryTransport {
        let mut wire = self.lock();
        // A restart replaces the node: its old links go down.
        let old_links: Vec<(NodeId, NodeId)> = wire
            .links
            .iter()
            .filter(|(a, b)| *a == node || *b == node)
            .cloned()
            .collect();
        for link in old_links {
            Self::unlink(&mut wire, &link);
        }
        wire.nodes.insert(node.clone(), (generation, inbound));
        wire.wanted.entry(node.clone()).or_default();
        let backlog = Self::backlog_of(&mut wire, &node);
        Self::reconcile(&mut wire);
        MemoryTransport {
            node,
            network: self.clone(),
            backlog,
        }
    }

    /// Detaches a node, as if its process died.
    pub fn leave(&self, node: &NodeId) {
        let mut wire = self.lock();
        wire.nodes.remove(node);
        wire.wanted.remove(node);
        Self::reconcile(&mut wire);
    }

    /// Cuts the link between two nodes until [`MemoryNetwork::heal`].
    pub fn cut(&self, a: &NodeId, b: &NodeId) {
        let mut wire = self.lock();
        wire.cut.insert(pair(a, b));
        Self::reconcile(&mut wire);
    }

    pub fn heal(&self, a: &NodeId, b: &NodeId) {
        let mut wire = self.lock();
        wire.cut.remove(&pair(a, b));
        Self::reconcile(&mut wire);
    }

    /// The backlog of `node`'s links, made on first use.
    fn backlog_of(wire: &mut Wire, node: &NodeId) -> Arc<Backlog> {
        wire.backlogs
            .entry(node.clone())
            .or_insert_with(|| Arc::new(Backlog::new(LINK_QUEUE)))
            .clone()
    }

    fn unlink(wire: &mut Wire, link: &(NodeId, NodeId)) {
        if !wire.links.remove(link) {
            return;
        }
        let (a, b) = link;
        wire.senders.remove(&(a.clone(), b.clone()));
        wire.senders.remove(&(b.clone(), a.clone()));
        for (to, gone) in [(a, b), (b, a)] {
            if let Some((_, inbound)) = wire.nodes.get(to) {
                let _ = inbound.try_send(Inbound::PeerDown { node: gone.clone() });
            }
        }
    }

    /// Brings links in line with what nodes want and what is cut: a link
    /// exists when either side wants it, both are attached, and it is not cut.
    fn reconcile(wire: &mut Wire) {
        let mut should: HashSet<(NodeId, NodeId)> = HashSet::new();
        for (node, peers) in &wire.wanted {
            for peer in peers {
                let link = pair(node, peer);
                if node != peer
                    && wire.nodes.contains_key(node)
                    && wire.nodes.contains_key(peer)
                    && !wire.cut.contains(&link)
                {
                    should.insert(link);
                }
            }
        }
        let stale: Vec<_> = wire.links.difference(&should).cloned().collect();
        for link in stale {
            Self::unlink(wire, &link);
        }
        let new: Vec<_> = should.difference(&wire.links).cloned().collect();
        for link in new {
            let (a, b) = &link;
            for (from, to) in [(a, b), (b, a)] {
                let Some((_, inbound)) = wire.nodes.get(to).cloned() else {
                    continue;
                };
                // `to` hears that `from` is up, and answers with the sink
                // that takes `from`'s frames.
                let generation = wire.nodes.get(from).map(|(g, _)| *g).unwrap_or(0);
                let (frames_tx, frames_rx) = oneshot::channel();
                let _ = inbound.try_send(Inbound::PeerUp {
                    node: from.clone(),
                    generation,
                    frames: frames_tx,
                });
                let (tx, mut rx) = mpsc::channel::<Bytes>(LINK_QUEUE);
                let backlog = Arc::new(LinkBacklog::new(Self::backlog_of(wire, from), LINK_QUEUE));
                wire.senders
                    .insert((from.clone(), to.clone()), (tx, backlog.clone()));
                let from_id = from.clone();
                // One forwarding task per direction keeps the link's order
                // and lets `send` stay non-blocking.
                tokio::spawn(async move {
                    let Ok(sink) = frames_rx.await else {
                        return;
                    };
                    while let Some(frame) = rx.recv().await {
                        if !sink.take(&from_id, frame).await {
                            return;
                        }
                        backlog.drained(rx.len());
                    }
                });
            }
            wire.links.insert(link);
        }
    }
}

/// One node's end of a [`MemoryNetwork`].
#[derive(Clone)]
pub struct MemoryTransport {
    node: NodeId,
    network: MemoryNetwork,
    backlog: Arc<Backlog>,
}

impl Transport for MemoryTransport {
    fn send(&self, to: &NodeId, frame: Bytes) -> Result<(), TransportError> {
        // The QUIC transport's limit, so that tests over memory see it too.
        if frame.len() > protocol::peer::MAX_PEER_FRAME_BYTES {
            return Err(TransportError::TooLarge {
                to: to.clone(),
                bytes: frame.len(),
            });
        }
        let wire = self.network.lock();
        let (sender, backlog) = wire
            .senders
            .get(&(self.node.clone(), to.clone()))
            .ok_or_else(|| TransportError::NotConnected(to.clone()))?;
        sender.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TransportError::QueueFull(to.clone()),
            mpsc::error::TrySendError::Closed(_) => TransportError::NotConnected(to.clone()),
        })?;
        backlog.queued(sender.max_capacity() - sender.capacity());
        Ok(())
    }

    fn set_peers(&self, peers: Vec<PeerAddr>) {
        let mut wire = self.network.lock();
        wire.wanted.insert(
            self.node.clone(),
            peers.into_iter().map(|p| p.node).collect(),
        );
        MemoryNetwork::reconcile(&mut wire);
    }

    fn backlog(&self) -> &Backlog {
        &self.backlog
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::testing::{events, Event};
    use std::time::Duration;

    fn peer(node: &str) -> PeerAddr {
        PeerAddr {
            node: node.into(),
            generation: 1,
            addr: "127.0.0.1:1".parse().expect("addr"),
        }
    }

    async fn next(rx: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("an event within 2 s")
            .expect("channel open")
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_cuts_report_down() {
        let net = MemoryNetwork::new();
        let (a_tx, a_inbound) = mpsc::channel(1024);
        let (b_tx, b_inbound) = mpsc::channel(1024);
        let (mut a_rx, mut b_rx) = (events(a_inbound), events(b_inbound));
        let a = net.join("a".into(), 1, a_tx);
        let _b = net.join("b".into(), 1, b_tx);
        assert!(a.send(&"b".into(), Bytes::from_static(b"x")).is_err());
        a.set_peers(vec![peer("b")]);
        assert!(matches!(next(&mut a_rx).await, Event::PeerUp { node, .. } if &*node == "b"));
        assert!(matches!(next(&mut b_rx).await, Event::PeerUp { node, .. } if &*node == "a"));
        for i in 0..1000u32 {
            a.send(&"b".into(), Bytes::from(i.to_be_bytes().to_vec()))
                .expect("send");
        }
        for i in 0..1000u32 {
            match next(&mut b_rx).await {
                Event::Frame { from, frame } => {
                    assert_eq!(&*from, "a");
                    assert_eq!(frame.as_ref(), i.to_be_bytes());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        net.cut(&"a".into(), &"b".into());
        assert!(matches!(next(&mut a_rx).await, Event::PeerDown { .. }));
        assert!(matches!(next(&mut b_rx).await, Event::PeerDown { .. }));
        assert!(a.send(&"b".into(), Bytes::from_static(b"x")).is_err());
        net.heal(&"a".into(), &"b".into());
        assert!(matches!(next(&mut a_rx).await, Event::PeerUp { .. }));
    }
}
