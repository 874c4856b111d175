//! Peer transport: ordered, batched frame delivery between cluster nodes.
//!
//! The cluster logic (router, shards, rebalancing) only sees [`Transport`]:
//! send encoded frames to a node id, and receive [`Inbound`] events. Two
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
//! connection ends.

pub mod memory;
pub mod quic;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

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
    /// An authenticated connection to `node` is up; frames can flow.
    PeerUp { node: NodeId, generation: u64 },
    /// The connection to `node` ended; frames sent to it since may be lost.
    PeerDown { node: NodeId },
    /// One encoded [`protocol::peer::PeerFrame`] from `from`.
    Frame { from: NodeId, frame: Bytes },
}

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
}

pub type SharedTransport = Arc<dyn Transport>;
