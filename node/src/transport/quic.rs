//! The QUIC peer transport: one mutually authenticated connection per pair
//! of nodes, a hello in each direction, then one long-lived unidirectional
//! stream per direction carrying length-delimited frames in order.
//!
//! Who dials: the node with the smaller id dials, the other waits. That
//! alone avoids duplicate connections; when one still appears (a restart,
//! a re-dial racing the old connection's death, a peer with another rule)
//! [`admit`] keeps exactly one, and both ends agree on which.
//!
//! A connection from a node `set_peers` has not listed yet is admitted: the
//! dialer's membership may be ahead of ours. One from a node `set_peers`
//! removed is refused until it is listed again or comes back with a newer
//! generation, so a node the cluster declared gone cannot dial its way in.
//!
//! Events are ordered per peer: a connection's frames come between its
//! `PeerUp` and its `PeerDown`, and a replaced connection's `PeerDown` comes
//! before its successor's `PeerUp`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use protocol::peer::{self, Hello, PeerCodecError, MAX_PEER_FRAME_BYTES};
use quinn::{Connection, VarInt};
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use super::{Backlog, FrameSink, Inbound, LinkBacklog, PeerAddr, Transport, TransportError};
use crate::metrics::{self, PeerStats};
use crate::owner::NodeId;
use crate::tls::{self, QuicConfigs, TlsError};

/// Frames queued for one peer before `send` answers `QueueFull`, by default
/// (`cluster.peer_queue_frames`).
pub const SEND_QUEUE_FRAMES: usize = 65_536;
/// Kernel buffer asked for the QUIC socket, each way. The default (often
/// 208 KiB) overflows in bursts between busy nodes: every datagram dropped
/// there is a QUIC loss that stalls the link's ordered stream until it is
/// sent again. The kernel caps it at `net.core.rmem_max` / `wmem_max`.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;
/// Frames written per flush: enough to amortise the flush, few enough that
/// a burst does not wait behind one huge write.
const WRITE_BATCH: usize = 1024;
/// A hello is a few dozen bytes; a peer is not allowed to make us buffer
/// the 64 MiB a frame may take before it proved who it is.
const MAX_HELLO_BYTES: usize = 16 * 1024;
/// TLS handshake plus hello exchange.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Handshakes in progress at once: unauthenticated work is bounded.
const MAX_HANDSHAKES: usize = 256;
/// How long a removed member stays refused (same or older generation).
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);
/// How long a peer's statistics outlive it once it is neither listed nor
/// connected: a peer that comes back soon keeps its counters, and the map
/// stays bounded by the members of the last few minutes.
const STATS_TTL: Duration = Duration::from_secs(600);
/// The length prefix of every frame on a stream, counted in the byte stats.
const LENGTH_PREFIX_BYTES: usize = 4;
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("the QUIC transport must start inside a tokio runtime")]
    NoRuntime,
    #[error("cannot listen on {addr} (cluster): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "this node's certificate is for node {cert}, but its node id is {node}: peers would \
         refuse every connection"
    )]
    IdentityMismatch { cert: String, node: String },
}

/// Application close codes: the peer's log says why it was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Shutdown = 0,
    Removed = 1,
    Replaced = 2,
    Version = 3,
    Cluster = 4,
    Identity = 5,
    Stale = 6,
    Duplicate = 7,
    Protocol = 8,
    Ended = 9,
}

impl Close {
    fn code(self) -> VarInt {
        VarInt::from_u32(self as u32)
    }

    /// Refusals that mean a misconfiguration or an impostor: worth a warning.
    fn is_alarming(self) -> bool {
        matches!(self, Close::Version | Close::Cluster | Close::Identity)
    }
}

/// Why a connection is not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    close: Close,
    reason: String,
}

impl Refusal {
    fn new(close: Close, reason: impl Into<String>) -> Refusal {
        Refusal {
            close,
            reason: reason.into(),
        }
    }
}

/// Why a connection attempt or a link ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot dial: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate: {0}")]
    Certificate(#[from] TlsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Codec(#[from] PeerCodecError),
    #[error("stream already closed")]
    ClosedStream(#[from] quinn::ClosedStream),
    #[error("the peer closed the stream before its hello")]
    NoHello,
    #[error("no TLS handshake and hello within {0:?}")]
    Timeout(Duration),
    #[error("refused: {}", .0.reason)]
    Refused(Refusal),
}

/// The QUIC [`Transport`]. Dropping it (or [`QuicTransport::shutdown`])
/// closes every connection and ends every task it started.
pub struct QuicTransport {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    local: Hello,
    local_id: NodeId,
    local_addr: SocketAddr,
    inbound: mpsc::Sender<Inbound>,
    state: RwLock<State>,
    stop: CancellationToken,
    tasks: Tasks,
    handshakes: Arc<Semaphore>,
    next_link: AtomicU64,
    backlog: Arc<Backlog>,
    /// Capacity of each link's send queue.
    queue_frames: usize,
}

#[derive(Default)]
struct State {
    /// The live members from the last `set_peers`.
    members: HashMap<NodeId, Member>,
    /// Members removed by `set_peers`: their generation, and since when.
    removed: HashMap<NodeId, (u64, Instant)>,
    /// Authenticated connections, one per peer.
    links: HashMap<NodeId, LinkHandle>,
    /// Per-peer statistics, kept across connections: every listed or
    /// connected peer, and for [`STATS_TTL`] those that were.
    stats: HashMap<NodeId, PeerEntry>,
}

#[derive(Default)]
struct PeerEntry {
    counters: Arc<PeerCounters>,
    /// Since when the peer is neither listed nor connected.
    gone_since: Option<Instant>,
}

/// One peer's counters, shared by its link's tasks and `send`.
#[derive(Default)]
struct PeerCounters {
    sent_frames: AtomicU64,
    sent_bytes: AtomicU64,
    received_frames: AtomicU64,
    received_bytes: AtomicU64,
    queue_full: AtomicU64,
    /// Connections announced with `PeerUp`.
    connections: AtomicU64,
}

impl PeerCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

impl State {
    /// The counters of `peer`, which is listed or connected (again).
    fn counters(&mut self, peer: &NodeId) -> Arc<PeerCounters> {
        let entry = self.stats.entry(peer.clone()).or_default();
        entry.gone_since = None;
        entry.counters.clone()
    }

    /// Starts the countdown to dropping `peer`'s statistics if it is now
    /// neither listed nor connected.
    fn stats_maybe_gone(&mut self, peer: &NodeId, now: Instant) {
        if self.members.contains_key(peer) || self.links.contains_key(peer) {
            return;
        }
        if let Some(entry) = self.stats.get_mut(peer) {
            entry.gone_since.get_or_insert(now);
        }
    }

    /// Drops the statistics of peers gone for [`STATS_TTL`].
    fn prune_stats(&mut self, now: Instant) {
        self.stats.retain(|_, entry| stats_live(entry, now));
    }
}

fn stats_live(entry: &PeerEntry, now: Instant) -> bool {
    entry
        .gone_since
        .is_none_or(|since| now.duration_since(since) < STATS_TTL)
}

struct Member {
    generation: u64,
    addr: SocketAddr,
    /// Cancels this member's dial loop; `None` when the peer dials us.
    dialer: Option<CancellationToken>,
}

struct LinkHandle {
    id: u64,
    generation: u64,
    dialed_by_us: bool,
    queue: mpsc::Sender<Bytes>,
    backlog: Arc<LinkBacklog>,
    connection: Connection,
    /// Cancelled once the link's task has sent its `PeerDown`.
    ended: CancellationToken,
    counters: Arc<PeerCounters>,
}

/// A connection admitted into `links`, not yet announced.
struct Registered {
    id: u64,
    queue: mpsc::Receiver<Bytes>,
    backlog: Arc<LinkBacklog>,
    counters: Arc<PeerCounters>,
    predecessor: Option<CancellationToken>,
    _ended: DropGuard,
}

/// A connection whose TLS handshake and hello read are done.
struct Pending {
    connection: Connection,
    /// The acceptor still owes its hello on this stream.
    send: Option<quinn::SendStream>,
    hello: Hello,
    cert_id: String,
}

impl QuicTransport {
    /// Listens on `bind` and starts accepting peers, on the current tokio
    /// runtime. `local` is the hello this node sends; its node id must be
    /// the one its certificate proves.
    pub fn start(
        bind: SocketAddr,
        tls: &QuicConfigs,
        local: Hello,
        inbound: mpsc::Sender<Inbound>,
        queue_frames: usize,
    ) -> Result<QuicTransport, QuicError> {
        if tls.node_id != local.node_id {
            return Err(QuicError::IdentityMismatch {
                cert: tls.node_id.clone(),
                node: local.node_id,
            });
        }
        QuicTransport::start_unchecked(bind, tls, local, inbound, queue_frames)
    }

    /// [`QuicTransport::start`] without the identity check: tests use it to
    /// play an impostor.
    fn start_unchecked(
        bind: SocketAddr,
        tls: &QuicConfigs,
        local: Hello,
        inbound: mpsc::Sender<Inbound>,
        queue_frames: usize,
    ) -> Result<QuicTransport, QuicError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| QuicError::NoRuntime)?;
        let socket = udp_socket(bind).map_err(|source| QuicError::Bind { addr: bind, source })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(tls.server.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| QuicError::Bind { addr: bind, source })?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| QuicError::Bind { addr: bind, source })?;
        let inner = Arc::new(Inner {
            endpoint,
            client: tls.client.clone(),
            local_id: Arc::from(local.node_id.as_str()),
            local,
            local_addr,
            inbound,
            state: RwLock::new(State::default()),
            stop: CancellationToken::new(),
            tasks: Tasks::new(runtime),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            next_link: AtomicU64::new(1),
            backlog: Arc::new(Backlog::new(queue_frames.max(1))),
            queue_frames: queue_frames.max(1),
        });
        inner.tasks.spawn(accept_loop(inner.clone()));
        info!(
            node_id = %inner.local_id,
            listen = %local_addr,
            generation = inner.local.generation,
            "cluster transport listening"
        );
        Ok(QuicTransport { inner })
    }

    /// The address the transport listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The peers with an authenticated connection, with their generation.
    pub fn connected(&self) -> Vec<(NodeId, u64)> {
        let state = self.inner.read();
        let mut peers: Vec<_> = state
            .links
            .iter()
            .map(|(node, link)| (node.clone(), link.generation))
            .collect();
        peers.sort();
        peers
    }

    /// Closes every connection and waits (bounded) for the transport's
    /// tasks to end. Each open connection's `PeerDown` is delivered if the
    /// inbound channel has room (shutdown does not wait for a reader).
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.stop.cancel();
        {
            let mut state = inner.write();
            for member in state.members.values() {
                if let Some(dialer) = &member.dialer {
                    dialer.cancel();
                }
            }
            for link in state.links.values() {
                link.connection
                    .close(Close::Shutdown.code(), b"node shutting down");
            }
            state.links.clear();
        }
        inner
            .endpoint
            .close(Close::Shutdown.code(), b"node shutting down");
        if timeout(SHUTDOWN_TIMEOUT, inner.tasks.idle()).await.is_err() {
            warn!(
                tasks = inner.tasks.live(),
                "cluster transport tasks still running after shutdown"
            );
        }
        // Gives the close frames a chance to reach the peers.
        let _ = timeout(Duration::from_secs(1), inner.endpoint.wait_idle()).await;
    }

    /// Tasks of this transport still running.
    pub fn live_tasks(&self) -> usize {
        self.inner.tasks.live()
    }

    /// Statistics of every listed or connected peer, and of those gone for
    /// less than ten minutes, sorted by node id. Counters survive
    /// reconnects.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.inner.peer_stats()
    }

    /// Makes the admin `/metrics` show [`QuicTransport::peer_stats`] (see
    /// [`metrics::render_all`]). Holds no reference that keeps the transport
    /// alive. One transport per process: false if another registered first.
    pub fn register_metrics(&self) -> bool {
        let inner = Arc::downgrade(&self.inner);
        metrics::set_peer_stats_source(Box::new(move || {
            inner
                .upgrade()
                .map(|inner| inner.peer_stats())
                .unwrap_or_default()
        }))
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        // The tasks hold the inner state: without this they would run on
        // after the last handle is gone.
        self.inner.stop.cancel();
        self.inner
            .endpoint
            .close(Close::Shutdown.code(), b"node shutting down");
    }
}

impl Transport for QuicTransport {
    fn send(&self, to: &NodeId, frame: Bytes) -> Result<(), TransportError> {
        // The peer's reader would refuse it and end the connection.
        if frame.len() > MAX_PEER_FRAME_BYTES {
            return Err(TransportError::TooLarge {
                to: to.clone(),
                bytes: frame.len(),
            });
        }
        let state = self.inner.read();
        let link = state
            .links
            .get(to)
            .ok_or_else(|| TransportError::NotConnected(to.clone()))?;
        link.queue.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                PeerCounters::add(&link.counters.queue_full, 1);
                TransportError::QueueFull(to.clone())
            }
            mpsc::error::TrySendError::Closed(_) => TransportError::NotConnected(to.clone()),
        })?;
        link.backlog
            .queued(link.queue.max_capacity() - link.queue.capacity());
        Ok(())
    }

    fn backlog(&self) -> &Backlog {
        &self.inner.backlog
    }

    fn set_peers(&self, peers: Vec<PeerAddr>) {
        let inner = &self.inner;
        if inner.stop.is_cancelled() {
            return;
        }
        // The newest generation of each node, this node left out.
        let mut wanted: HashMap<NodeId, PeerAddr> = HashMap::new();
        for peer in peers {
            if peer.node == inner.local_id {
                continue;
            }
            match wanted.get(&peer.node) {
                Some(have) if have.generation >= peer.generation => {}
                _ => {
                    wanted.insert(peer.node.clone(), peer);
                }
            }
        }

        let mut state = inner.write();
        let now = Instant::now();
        state
            .removed
            .retain(|_, (_, since)| now.duration_since(*since) < TOMBSTONE_TTL);
        state.prune_stats(now);

        let gone: Vec<NodeId> = state
            .members
            .keys()
            .filter(|node| !wanted.contains_key(*node))
            .cloned()
            .collect();
        for node in gone {
            if let Some(member) = state.members.remove(&node) {
                if let Some(dialer) = member.dialer {
                    dialer.cancel();
                }
                state.removed.insert(node.clone(), (member.generation, now));
                info!(peer = %node, generation = member.generation, "peer no longer a member");
            }
            if let Some(link) = state.links.remove(&node) {
                link.connection
                    .close(Close::Removed.code(), b"no longer a member");
            }
            state.stats_maybe_gone(&node, now);
        }

        for (node, peer) in wanted {
            state.counters(&node);
            if let Some(member) = state.members.get(&node) {
                if member.generation == peer.generation && member.addr == peer.addr {
                    continue;
                }
            }
            if let Some(old) = state.members.remove(&node) {
                if let Some(dialer) = old.dialer {
                    dialer.cancel();
                }
            }
            state.removed.remove(&node);
            let stale = state
                .links
                .get(&node)
                .is_some_and(|link| link.generation < peer.generation);
            if stale {
                if let Some(link) = state.links.remove(&node) {
                    info!(peer = %node, old = link.generation, new = peer.generation, "peer restarted: closing the old connection");
                    link.connection
                        .close(Close::Replaced.code(), b"a newer generation replaces you");
                }
            }
            let dialer = (inner.local_id < node).then(|| {
                let token = inner.stop.child_token();
                inner.tasks.spawn(dial_loop(
                    inner.clone(),
                    node.clone(),
                    peer.generation,
                    peer.addr,
                    token.clone(),
                ));
                token
            });
            state.members.insert(
                node,
                Member {
                    generation: peer.generation,
                    addr: peer.addr,
                    dialer,
                },
            );
        }
    }
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain maps behind,
        // still consistent enough to route and to shut down.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits an authenticated, hello-checked connection as the link to
    /// `peer`, replacing (and closing) the one it wins against. `dialer` is
    /// the dial loop's token for a connection this node dialed.
    fn register(
        &self,
        peer: &NodeId,
        generation: u64,
        connection: &Connection,
        dialer: Option<&CancellationToken>,
    ) -> Result<Registered, Refusal> {
        let mut state = self.write();
        if self.stop.is_cancelled() {
            return Err(Refusal::new(Close::Shutdown, "node shutting down"));
        }
        match dialer {
            Some(token) if token.is_cancelled() => {
                return Err(Refusal::new(Close::Removed, "no longer a member"));
            }
            Some(_) => {}
            None => match (state.members.get(peer), state.removed.get(peer)) {
                (Some(member), _) if generation < member.generation => {
                    return Err(Refusal::new(
                        Close::Stale,
                        format!(
                            "generation {generation} is older than the member's {}",
                            member.generation
                        ),
                    ));
                }
                (None, Some((removed, _))) if generation <= *removed => {
                    return Err(Refusal::new(Close::Removed, "not a member"));
                }
                _ => {}
            },
        }
        let dialed_by_us = dialer.is_some();
        let existing = state
            .links
            .get(peer)
            .map(|link| (link.generation, link.dialed_by_us));
        let predecessor = match admit(
            existing,
            generation,
            dialed_by_us,
            self.local_id.as_ref() < peer.as_ref(),
        ) {
            Admit::Refuse(refusal) => return Err(refusal),
            Admit::New => None,
            Admit::Replace => state.links.remove(peer).map(|old| {
                info!(peer = %peer, "a new connection replaces the old one");
                old.connection
                    .close(Close::Replaced.code(), b"replaced by a newer connection");
                old.ended
            }),
        };
        let (queue, rx) = mpsc::channel(self.queue_frames);
        let backlog = Arc::new(LinkBacklog::new(self.backlog.clone(), self.queue_frames));
        let ended = CancellationToken::new();
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        state.prune_stats(Instant::now());
        let counters = state.counters(peer);
        state.links.insert(
            peer.clone(),
            LinkHandle {
                id,
                generation,
                dialed_by_us,
                queue,
                backlog: backlog.clone(),
                connection: connection.clone(),
                ended: ended.clone(),
                counters: counters.clone(),
            },
        );
        Ok(Registered {
            id,
            queue: rx,
            backlog,
            counters,
            predecessor,
            _ended: ended.drop_guard(),
        })
    }

    /// Sends a peer event, waiting for room; once the transport stops, a
    /// cluster that no longer reads must not hold up the shutdown. False
    /// when the event was not delivered.
    async fn announce(&self, event: Inbound) -> bool {
        tokio::select! {
            biased;
            sent = self.inbound.send(event) => sent.is_ok(),
            _ = self.stop.cancelled() => false,
        }
    }

    fn unregister(&self, peer: &NodeId, id: u64) {
        let mut state = self.write();
        if state.links.get(peer).is_some_and(|link| link.id == id) {
            state.links.remove(peer);
            state.stats_maybe_gone(peer, Instant::now());
        }
    }

    fn peer_stats(&self) -> Vec<PeerStats> {
        let state = self.read();
        let now = Instant::now();
        let mut stats: Vec<PeerStats> = state
            .stats
            .iter()
            .filter(|(_, entry)| stats_live(entry, now))
            .map(|(node, entry)| {
                let connection = state
                    .links
                    .get(node)
                    .map(|link| &link.connection)
                    .filter(|connection| connection.close_reason().is_none());
                let c = &*entry.counters;
                PeerStats {
                    peer: node.clone(),
                    connected: connection.is_some(),
                    rtt: connection.map(Connection::rtt),
                    sent_frames: PeerCounters::get(&c.sent_frames),
                    sent_bytes: PeerCounters::get(&c.sent_bytes),
                    received_frames: PeerCounters::get(&c.received_frames),
                    received_bytes: PeerCounters::get(&c.received_bytes),
                    reconnects: PeerCounters::get(&c.connections).saturating_sub(1),
                    send_queue_full: PeerCounters::get(&c.queue_full),
                }
            })
            .collect();
        stats.sort_by(|a, b| a.peer.cmp(&b.peer));
        stats
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Admit {
    New,
    Replace,
    Refuse(Refusal),
}

/// Decides between the existing link to a peer (its generation, and
/// whether this node dialed it) and a new authenticated connection. Both
/// ends reach the same answer: a newer generation wins; within one, the
/// connection dialed by the smaller node id wins, and between two dialed by
/// the same node the newer wins (that node gave the old one up).
fn admit(
    existing: Option<(u64, bool)>,
    generation: u64,
    dialed_by_us: bool,
    local_is_smaller: bool,
) -> Admit {
    let Some((old_generation, old_dialed_by_us)) = existing else {
        return Admit::New;
    };
    if generation < old_generation {
        return Admit::Refuse(Refusal::new(
            Close::Stale,
            format!("generation {generation} is older than the connected {old_generation}"),
        ));
    }
    if generation > old_generation || dialed_by_us == old_dialed_by_us {
        return Admit::Replace;
    }
    let dialer_is_smaller = dialed_by_us == local_is_smaller;
    if dialer_is_smaller {
        Admit::Replace
    } else {
        Admit::Refuse(Refusal::new(
            Close::Duplicate,
            "already connected (the smaller node id dials)",
        ))
    }
}

/// Checks a peer's hello against this node's and the peer's certificate.
/// `dialed` is the node id and listed generation this node dialed.
fn check_hello(
    local: &Hello,
    cert_id: &str,
    hello: &Hello,
    dialed: Option<(&str, u64)>,
) -> Result<(), Refusal> {
    if hello.version != local.version {
        return Err(Refusal::new(
            Close::Version,
            format!(
                "peer protocol version {}, this node speaks {}",
                hello.version, local.version
            ),
        ));
    }
    if hello.cluster != local.cluster {
        return Err(Refusal::new(
            Close::Cluster,
            format!(
                "peer is in cluster {:?}, this node in {:?}",
                hello.cluster, local.cluster
            ),
        ));
    }
    if hello.node_id != cert_id {
        return Err(Refusal::new(
            Close::Identity,
            format!(
                "hello says node {:?} but the certificate is for {cert_id:?}",
                hello.node_id
            ),
        ));
    }
    if hello.node_id == local.node_id {
        return Err(Refusal::new(
            Close::Identity,
            "peer claims this node's own id",
        ));
    }
    if let Some((expected, listed)) = dialed {
        if hello.node_id != expected {
            return Err(Refusal::new(
                Close::Identity,
                format!("dialed node {expected:?} but {:?} answered", hello.node_id),
            ));
        }
        if hello.generation < listed {
            return Err(Refusal::new(
                Close::Stale,
                format!(
                    "generation {} is older than the member's {listed}",
                    hello.generation
                ),
            ));
        }
    }
    Ok(())
}

fn refuse(connection: &Connection, refusal: &Refusal, peer: &str) {
    let addr = connection.remote_address();
    if refusal.close.is_alarming() {
        warn!(peer, %addr, reason = %refusal.reason, "refusing a cluster connection");
    } else {
        debug!(peer, %addr, reason = %refusal.reason, "refusing a cluster connection");
    }
    connection.close(refusal.close.code(), refusal.reason.as_bytes());
}

async fn accept_loop(inner: Arc<Inner>) {
    loop {
        let incoming = tokio::select! {
            _ = inner.stop.cancelled() => break,
            incoming = inner.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Ok(permit) = inner.handshakes.clone().try_acquire_owned() else {
            warn!(addr = %incoming.remote_address(), "too many cluster handshakes in progress: refusing a connection");
            incoming.refuse();
            continue;
        };
        inner
            .tasks
            .spawn(accept_one(inner.clone(), incoming, permit));
    }
    debug!("cluster accept loop ended");
}

async fn accept_one(inner: Arc<Inner>, incoming: quinn::Incoming, permit: OwnedSemaphorePermit) {
    let addr = incoming.remote_address();
    let handshake = async {
        let connection = incoming.await?;
        let result = async {
            let cert_id = peer_cert_id(&connection)?;
            let (send, recv) = connection.accept_bi().await?;
            let hello = read_hello(recv).await?;
            Ok::<_, LinkError>((send, hello, cert_id))
        }
        .await;
        match result {
            Ok((send, hello, cert_id)) => Ok(Pending {
                connection,
                send: Some(send),
                hello,
                cert_id,
            }),
            Err(e) => {
                let e = explain(&connection, e);
                connection.close(Close::Protocol.code(), b"bad hello");
                Err(e)
            }
        }
    };
    let pending = tokio::select! {
        _ = inner.stop.cancelled() => return,
        result = timeout(HANDSHAKE_TIMEOUT, handshake) => {
            result.unwrap_or(Err(LinkError::Timeout(HANDSHAKE_TIMEOUT)))
        }
    };
    let mut pending = match pending {
        Ok(pending) => pending,
        Err(e) => {
            // Unauthenticated input: a failed handshake is not worth more
            // than a debug line each (a scanner would flood the log).
            debug!(%addr, error = %e, "inbound cluster handshake failed");
            return;
        }
    };
    if let Err(refusal) = check_hello(&inner.local, &pending.cert_id, &pending.hello, None) {
        refuse(&pending.connection, &refusal, &pending.cert_id);
        return;
    }
    let peer: NodeId = Arc::from(pending.hello.node_id.as_str());
    let registered =
        match inner.register(&peer, pending.hello.generation, &pending.connection, None) {
            Ok(registered) => registered,
            Err(refusal) => {
                refuse(&pending.connection, &refusal, &peer);
                return;
            }
        };
    drop(permit);
    // Registered before answering: a dialer that gets our hello is admitted.
    let answered = match pending.send.take() {
        Some(send) => timeout(HANDSHAKE_TIMEOUT, write_hello(send, &inner.local))
            .await
            .unwrap_or(Err(LinkError::Timeout(HANDSHAKE_TIMEOUT))),
        None => Ok(()),
    };
    if let Err(e) = answered {
        debug!(peer = %peer, %addr, error = %e, "cannot answer a hello");
        inner.unregister(&peer, registered.id);
        pending
            .connection
            .close(Close::Protocol.code(), b"hello failed");
        return;
    }
    run_link(
        &inner,
        pending.connection,
        peer,
        pending.hello.generation,
        registered,
    )
    .await;
}

/// Dials `peer` while it stays listed with this generation and address,
/// re-dialing with backoff when the attempt fails or the link ends.
async fn dial_loop(
    inner: Arc<Inner>,
    peer: NodeId,
    generation: u64,
    addr: SocketAddr,
    token: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    let mut warn_at = 1u32;
    loop {
        let attempt = tokio::select! {
            _ = token.cancelled() => return,
            result = timeout(HANDSHAKE_TIMEOUT, dial_hello(&inner, &peer, addr)) => {
                result.unwrap_or(Err(LinkError::Timeout(HANDSHAKE_TIMEOUT)))
            }
        };
        let outcome = match attempt {
            Ok(pending) => {
                let checked = check_hello(
                    &inner.local,
                    &pending.cert_id,
                    &pending.hello,
                    Some((&peer, generation)),
                )
                .and_then(|()| {
                    inner.register(
                        &peer,
                        pending.hello.generation,
                        &pending.connection,
                        Some(&token),
                    )
                });
                match checked {
                    Ok(registered) => {
                        run_link(
                            &inner,
                            pending.connection,
                            peer.clone(),
                            pending.hello.generation,
                            registered,
                        )
                        .await;
                        Ok(())
                    }
                    Err(refusal) => {
                        refuse(&pending.connection, &refusal, &peer);
                        Err(LinkError::Refused(refusal))
                    }
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                failures = 0;
                warn_at = 1;
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                // One warning per failure streak (and a reminder now and
                // then); the rest at debug, the loop retries every 5 s.
                if failures >= warn_at {
                    warn_at = failures.saturating_add(60);
                    warn!(peer = %peer, %addr, failures, error = %e, "cannot connect to peer");
                } else {
                    debug!(peer = %peer, %addr, failures, error = %e, "cannot connect to peer");
                }
            }
        }
        let pause = backoff.mul_f64(rand::random_range(0.5..1.0));
        if failures > 0 {
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// TLS handshake with `peer` at `addr` (its certificate must name it), then
/// the hello exchange.
async fn dial_hello(inner: &Inner, peer: &str, addr: SocketAddr) -> Result<Pending, LinkError> {
    let connection = inner
        .endpoint
        .connect_with(inner.client.clone(), addr, peer)?
        .await?;
    let result = async {
        let cert_id = peer_cert_id(&connection)?;
        let (send, recv) = connection.open_bi().await?;
        write_hello(send, &inner.local).await?;
        let hello = read_hello(recv).await?;
        Ok::<_, LinkError>((hello, cert_id))
    }
    .await;
    match result {
        Ok((hello, cert_id)) => Ok(Pending {
            connection,
            send: None,
            hello,
            cert_id,
        }),
        Err(e) => {
            let e = explain(&connection, e);
            connection.close(Close::Protocol.code(), b"hello failed");
            Err(e)
        }
    }
}

/// The QUIC socket, with kernel buffers sized for bursts between nodes.
fn udp_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Asking for more than the kernel allows is not an error: it is capped.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    // Linux reports twice what it grants (its bookkeeping overhead).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < UDP_BUFFER_BYTES {
        warn!(
            granted_bytes = granted,
            wanted_bytes = UDP_BUFFER_BYTES,
            "the QUIC socket's receive buffer is smaller than wanted: bursts between nodes may \
             drop datagrams and stall links (raise net.core.rmem_max, see docs/production.md)"
        );
    }
    socket.bind(&bind.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A stream error only says "connection lost"; the connection knows why
/// (a refusal's reason, a timeout).
fn explain(connection: &Connection, error: LinkError) -> LinkError {
    match (&error, connection.close_reason()) {
        (LinkError::Io(_), Some(reason)) => LinkError::Connection(reason),
        _ => error,
    }
}

/// Announces the link, carries frames both ways until the connection ends,
/// then announces its end.
async fn run_link(
    inner: &Inner,
    connection: Connection,
    peer: NodeId,
    generation: u64,
    registered: Registered,
) {
    let Registered {
        id,
        queue,
        backlog,
        counters,
        predecessor,
        _ended,
    } = registered;
    if let Some(predecessor) = predecessor {
        // Its PeerDown goes first.
        predecessor.cancelled().await;
    }
    let addr = connection.remote_address();
    let (frames_tx, frames_rx) = oneshot::channel();
    let announced = inner
        .announce(Inbound::PeerUp {
            node: peer.clone(),
            generation,
            frames: frames_tx,
        })
        .await;
    // The cluster answers once it is ready for the peer's frames.
    let sink = match announced {
        true => tokio::select! {
            sink = frames_rx => sink.ok(),
            _ = inner.stop.cancelled() => None,
        },
        false => None,
    };
    let Some(sink) = sink else {
        // Stopping: a PeerDown without its PeerUp would only confuse.
        connection.close(Close::Shutdown.code(), b"node shutting down");
        inner.unregister(&peer, id);
        return;
    };
    PeerCounters::add(&counters.connections, 1);
    info!(peer = %peer, %addr, generation, "peer up");

    let result = tokio::select! {
        result = read_frames(&connection, &peer, sink.as_ref(), &counters) => result,
        result = write_frames(&connection, queue, &backlog, &counters) => result,
        error = connection.closed() => Err(error.into()),
    };
    let result = result.map_err(|e| explain(&connection, e));
    let reason = match &result {
        Ok(()) => "closed".to_owned(),
        Err(e) => e.to_string(),
    };
    let close = match &result {
        Ok(()) => Close::Ended,
        Err(_) => Close::Protocol,
    };
    connection.close(close.code(), b"link ended");
    inner.unregister(&peer, id);
    inner
        .announce(Inbound::PeerDown { node: peer.clone() })
        .await;
    info!(peer = %peer, %addr, reason, "peer down");
}

/// Hands the peer's frames to the sink, waiting when the cluster is behind.
async fn read_frames(
    connection: &Connection,
    peer: &NodeId,
    sink: &dyn FrameSink,
    counters: &PeerCounters,
) -> Result<(), LinkError> {
    let recv = connection.accept_uni().await?;
    let mut frames = FramedRead::new(recv, codec(MAX_PEER_FRAME_BYTES));
    while let Some(frame) = frames.next().await {
        let frame = frame?.freeze();
        PeerCounters::add(&counters.received_frames, 1);
        PeerCounters::add(
            &counters.received_bytes,
            (frame.len() + LENGTH_PREFIX_BYTES) as u64,
        );
        if !sink.take(peer, frame).await {
            // Nobody takes frames any more: the node is stopping.
            return Ok(());
        }
    }
    Ok(())
}

/// Writes whatever is queued, one flush per batch. `send` refused frames
/// above the limit; the codec would fail on one.
async fn write_frames(
    connection: &Connection,
    mut queue: mpsc::Receiver<Bytes>,
    backlog: &LinkBacklog,
    counters: &PeerCounters,
) -> Result<(), LinkError> {
    let send = connection.open_uni().await?;
    let mut out = FramedWrite::new(send, codec(MAX_PEER_FRAME_BYTES));
    // Hands quinn 64 KiB at a time instead of the 8 KiB default: fewer
    // wake-ups of the connection driver for a burst of small frames.
    out.set_backpressure_boundary(64 * 1024);
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while queue.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let frames = batch.len() as u64;
        let mut bytes = 0;
        for frame in batch.drain(..) {
            bytes += (frame.len() + LENGTH_PREFIX_BYTES) as u64;
            out.feed(frame).await?;
        }
        SinkExt::<Bytes>::flush(&mut out).await?;
        backlog.drained(queue.len());
        PeerCounters::add(&counters.sent_frames, frames);
        PeerCounters::add(&counters.sent_bytes, bytes);
    }
    // The link was dropped from `links`: say we are done cleanly.
    out.into_inner().finish()?;
    Ok(())
}

async fn read_hello(recv: quinn::RecvStream) -> Result<Hello, LinkError> {
    let mut frames = FramedRead::new(recv, codec(MAX_HELLO_BYTES));
    let frame = frames.next().await.ok_or(LinkError::NoHello)??;
    Ok(peer::decode::<Hello>(&frame)?)
}

async fn write_hello(send: quinn::SendStream, hello: &Hello) -> Result<(), LinkError> {
    let mut out = FramedWrite::new(send, codec(MAX_HELLO_BYTES));
    out.send(peer::encode(hello)?).await?;
    out.into_inner().finish()?;
    Ok(())
}

fn codec(max_frame_length: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(LENGTH_PREFIX_BYTES)
        .max_frame_length(max_frame_length)
        .new_codec()
}

/// The node id the peer's (already CA-verified) certificate proves.
fn peer_cert_id(connection: &Connection) -> Result<String, LinkError> {
    let identity = connection.peer_identity().ok_or(LinkError::NoCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| LinkError::NoCertificate)?;
    let leaf = chain.first().ok_or(LinkError::NoCertificate)?;
    Ok(tls::peer_node_id(leaf)?)
}

/// Counts the transport's tasks so that shutdown can wait for all of them.
struct Tasks {
    runtime: tokio::runtime::Handle,
    live: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

struct TaskGuard {
    live: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

impl Tasks {
    fn new(runtime: tokio::runtime::Handle) -> Tasks {
        Tasks {
            runtime,
            live: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
        }
    }

    /// Spawns on the runtime the transport started on: `set_peers` may be
    /// called from outside it.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.live.fetch_add(1, Ordering::AcqRel);
        let guard = TaskGuard {
            live: self.live.clone(),
            idle: self.idle.clone(),
        };
        self.runtime.spawn(async move {
            let _guard = guard;
            task.await;
        });
    }

    fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use protocol::peer::{PeerFrame, PEER_PROTOCOL_VERSION};

    use super::*;
    use crate::cert::{self, TestDir};
    use crate::tls::TlsMaterial;
    use crate::transport::testing::{events, Event};

    /// Bound on every wait for something that should happen.
    const WAIT: Duration = Duration::from_secs(15);
    /// How long nothing must happen, when nothing should.
    const QUIET: Duration = Duration::from_millis(1500);

    /// A CA with node certificates made on demand.
    struct Pki {
        dir: TestDir,
    }

    impl Pki {
        fn new(tag: &str) -> Pki {
            let dir = TestDir::new(tag);
            cert::make_ca(&dir.path().join("ca")).expect("ca");
            Pki { dir }
        }

        fn ca(&self) -> PathBuf {
            self.dir.path().join("ca").join(cert::CA_CERT_FILE)
        }

        fn node_files(&self, id: &str) -> cert::NodeFiles {
            cert::make_node(
                &self.dir.path().join("ca"),
                id,
                &self.dir.path().join("nodes"),
                &[],
            )
            .expect("node cert")
        }

        fn configs(&self, id: &str) -> QuicConfigs {
            let files = self.node_files(id);
            TlsMaterial::load(&self.ca(), &files.cert, &files.key)
                .expect("load")
                .quic_configs(Duration::from_millis(500), Duration::from_secs(5))
                .expect("configs")
        }
    }

    fn hello(cluster: &str, id: &str, generation: u64) -> Hello {
        Hello {
            version: PEER_PROTOCOL_VERSION,
            cluster: cluster.into(),
            node_id: id.into(),
            generation,
        }
    }

    struct Node {
        transport: QuicTransport,
        events: mpsc::Receiver<Event>,
        id: NodeId,
        generation: u64,
    }

    fn start(configs: &QuicConfigs, hello: Hello) -> Node {
        // RUST_LOG=node::transport=debug shows why connections fail.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let (tx, inbound) = mpsc::channel(1024);
        let id: NodeId = Arc::from(hello.node_id.as_str());
        let generation = hello.generation;
        let transport = QuicTransport::start_unchecked(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            configs,
            hello,
            tx,
            SEND_QUEUE_FRAMES,
        )
        .expect("start");
        Node {
            transport,
            events: events(inbound),
            id,
            generation,
        }
    }

    fn frame(i: u64) -> Bytes {
        peer::encode(&PeerFrame::InterestAck { req: i }).expect("encode")
    }

    impl Node {
        fn addr(&self) -> PeerAddr {
            PeerAddr {
                node: self.id.clone(),
                generation: self.generation,
                addr: self.transport.local_addr(),
            }
        }

        async fn next(&mut self) -> Event {
            match timeout(WAIT, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => panic!("{}: event channel closed", self.id),
                Err(_) => panic!("{}: no event within {WAIT:?}", self.id),
            }
        }

        async fn expect_up(&mut self, peer: &Node) {
            match self.next().await {
                Event::PeerUp { node, generation } => {
                    assert_eq!(node, peer.id, "{}", self.id);
                    assert_eq!(generation, peer.generation, "{}", self.id);
                }
                other => panic!(
                    "{}: expected PeerUp from {}, got {other:?}",
                    self.id, peer.id
                ),
            }
        }

        async fn expect_down(&mut self, peer: &NodeId) {
            match self.next().await {
                Event::PeerDown { node } => assert_eq!(&node, peer, "{}", self.id),
                other => panic!("{}: expected PeerDown of {peer}, got {other:?}", self.id),
            }
        }

        async fn expect_quiet(&mut self, how_long: Duration) {
            if let Ok(event) = timeout(how_long, self.events.recv()).await {
                panic!("{}: expected no event, got {event:?}", self.id);
            }
        }

        /// Receives `count` frames from `from`, checking they come in order.
        async fn expect_frames(&mut self, from: &NodeId, count: u64) {
            for i in 0..count {
                match self.next().await {
                    Event::Frame {
                        from: sender,
                        frame,
                    } => {
                        assert_eq!(&sender, from);
                        let decoded: PeerFrame = peer::decode(&frame).expect("decode");
                        assert_eq!(decoded, PeerFrame::InterestAck { req: i }, "{}", self.id);
                    }
                    other => panic!("{}: expected frame {i}, got {other:?}", self.id),
                }
            }
        }

        /// Shuts down, checking that no task outlives the transport.
        async fn stop(self) {
            self.transport.shutdown().await;
            assert_eq!(self.transport.live_tasks(), 0, "{}: tasks left", self.id);
        }
    }

    async fn connect(a: &mut Node, b: &mut Node) {
        a.transport.set_peers(vec![b.addr()]);
        b.transport.set_peers(vec![a.addr()]);
        a.expect_up(b).await;
        b.expect_up(a).await;
    }

    fn stats_of(node: &Node, peer: &NodeId) -> PeerStats {
        node.transport
            .peer_stats()
            .into_iter()
            .find(|stats| &stats.peer == peer)
            .unwrap_or_else(|| panic!("{}: no stats for {peer}", node.id))
    }

    /// Waits until `check` holds (a writer counts a batch just after
    /// handing it to QUIC, so a receiver may see the frames first).
    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !check() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peer_stats_count_traffic_and_survive_a_reconnect() {
        let pki = Pki::new("quic-stats");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        let mut b = start(&pki.configs("n2"), hello("herald", "n2", 1));
        assert!(a.transport.peer_stats().is_empty());
        connect(&mut a, &mut b).await;
        let (a_id, b_id) = (a.id.clone(), b.id.clone());

        const N: u64 = 100;
        for i in 0..N {
            a.transport.send(&b_id, frame(i)).expect("send a->b");
            b.transport.send(&a_id, frame(i)).expect("send b->a");
        }
        b.expect_frames(&a_id, N).await;
        a.expect_frames(&b_id, N).await;
        let bytes = |n: u64| -> u64 {
            (0..n)
                .map(|i| (frame(i).len() + LENGTH_PREFIX_BYTES) as u64)
                .sum()
        };
        for (node, peer) in [(&a, &b_id), (&b, &a_id)] {
            eventually("all frames counted", || {
                let stats = stats_of(node, peer);
                stats.sent_frames == N && stats.received_frames == N
            })
            .await;
            let stats = stats_of(node, peer);
            assert!(stats.connected, "{}", node.id);
            assert!(
                stats.rtt.is_some_and(|rtt| rtt > Duration::ZERO),
                "{}: {:?}",
                node.id,
                stats.rtt
            );
            assert_eq!(stats.sent_bytes, bytes(N), "{}", node.id);
            assert_eq!(stats.received_bytes, bytes(N), "{}", node.id);
            assert_eq!(stats.reconnects, 0, "{}", node.id);
            assert_eq!(stats.send_queue_full, 0, "{}", node.id);
        }

        // Cut the connection under both: n1 re-dials.
        let connection = a
            .transport
            .inner
            .read()
            .links
            .get(&b_id)
            .expect("link")
            .connection
            .clone();
        connection.close(VarInt::from_u32(0), b"test: forced reconnect");
        a.expect_down(&b_id).await;
        b.expect_down(&a_id).await;
        a.expect_up(&b).await;
        b.expect_up(&a).await;
        a.transport.send(&b_id, frame(N)).expect("send a->b");
        b.transport.send(&a_id, frame(N)).expect("send b->a");
        for (node, peer) in [(&mut b, &a_id), (&mut a, &b_id)] {
            match node.next().await {
                Event::Frame { from, .. } => assert_eq!(&from, peer),
                other => panic!("{}: expected a frame, got {other:?}", node.id),
            }
        }
        for (node, peer) in [(&a, &b_id), (&b, &a_id)] {
            eventually("the frame after the reconnect counted", || {
                stats_of(node, peer).sent_frames == N + 1
            })
            .await;
            let stats = stats_of(node, peer);
            assert!(stats.connected, "{}", node.id);
            assert_eq!(stats.reconnects, 1, "{}", node.id);
            assert_eq!(stats.received_frames, N + 1, "{}", node.id);
            assert_eq!(stats.sent_bytes, bytes(N + 1), "{}", node.id);
            assert_eq!(stats.received_bytes, bytes(N + 1), "{}", node.id);
        }

        // What /metrics shows (the only test that registers a source).
        assert!(a.transport.register_metrics());
        let text = metrics::render_all();
        for line in [
            "herald_peer_connected{peer=\"n2\"} 1\n",
            "herald_peer_reconnects_total{peer=\"n2\"} 1\n",
            "herald_peer_sent_frames_total{peer=\"n2\"} 101\n",
            "herald_peer_rtt_seconds{peer=\"n2\"} ",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }

        // No longer listed: kept (disconnected) for a while, then dropped.
        a.transport.set_peers(Vec::new());
        a.expect_down(&b_id).await;
        b.expect_down(&a_id).await;
        let stats = stats_of(&a, &b_id);
        assert!(!stats.connected);
        assert_eq!(stats.rtt, None);
        assert_eq!(stats.sent_frames, N + 1);
        a.transport
            .inner
            .write()
            .prune_stats(Instant::now() + STATS_TTL);
        assert!(a.transport.peer_stats().is_empty());
        // b still lists n1: its entry stays, disconnected.
        assert!(!stats_of(&b, &a_id).connected);
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_above_the_limit_is_refused_and_the_connection_stays() {
        let pki = Pki::new("quic-too-large");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        let mut b = start(&pki.configs("n2"), hello("herald", "n2", 1));
        connect(&mut a, &mut b).await;
        let (a_id, b_id) = (a.id.clone(), b.id.clone());

        // Zeroed pages: cheap until touched, and refused before they are.
        let huge = Bytes::from(vec![0u8; MAX_PEER_FRAME_BYTES + 1]);
        match a.transport.send(&b_id, huge) {
            Err(TransportError::TooLarge { to, bytes }) => {
                assert_eq!(to, b_id);
                assert_eq!(bytes, MAX_PEER_FRAME_BYTES + 1);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        a.transport.send(&b_id, frame(0)).expect("send a->b");
        b.expect_frames(&a_id, 1).await;
        b.transport.send(&a_id, frame(0)).expect("send b->a");
        a.expect_frames(&b_id, 1).await;
        a.expect_quiet(QUIET).await;
        b.expect_quiet(Duration::from_millis(100)).await;
        assert_eq!(a.transport.connected(), vec![(b_id.clone(), 1)]);
        eventually("one frame counted", || stats_of(&a, &b_id).sent_frames == 1).await;
        assert_eq!(stats_of(&a, &b_id).reconnects, 0);
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_flow_both_ways_in_order() {
        let pki = Pki::new("quic-frames");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        let mut b = start(&pki.configs("n2"), hello("herald", "n2", 1));
        connect(&mut a, &mut b).await;

        const N: u64 = 10_000;
        for i in 0..N {
            a.transport.send(&b.id, frame(i)).expect("send a->b");
            b.transport.send(&a.id, frame(i)).expect("send b->a");
        }
        let a_id = a.id.clone();
        let b_id = b.id.clone();
        b.expect_frames(&a_id, N).await;
        a.expect_frames(&b_id, N).await;

        let unknown: NodeId = Arc::from("n9");
        assert!(matches!(
            a.transport.send(&unknown, frame(0)),
            Err(TransportError::NotConnected(_))
        ));
        assert_eq!(a.transport.connected(), vec![(b_id.clone(), 1)]);

        a.transport.shutdown().await;
        a.expect_down(&b_id).await;
        b.expect_down(&a_id).await;
        assert!(matches!(
            b.transport.send(&a_id, frame(0)),
            Err(TransportError::NotConnected(_))
        ));
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_does_not_read_fills_the_queue() {
        let pki = Pki::new("quic-full");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        let mut b = start(&pki.configs("n2"), hello("herald", "n2", 1));
        connect(&mut a, &mut b).await;
        // b never reads its events: its reader stops, QUIC flow control
        // stops a's writer, and a's queue fills up instead of blocking.
        let payload = Bytes::from(vec![7u8; 1024]);
        let mut full = false;
        for _ in 0..4 * SEND_QUEUE_FRAMES {
            match a.transport.send(&b.id, payload.clone()) {
                Ok(()) => {}
                Err(TransportError::QueueFull(node)) => {
                    assert_eq!(node, b.id);
                    full = true;
                    break;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(full, "the queue never filled");
        assert_eq!(stats_of(&a, &b.id).send_queue_full, 1);
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn simultaneous_set_peers_make_one_connection() {
        let pki = Pki::new("quic-simul");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        let mut b = start(&pki.configs("n2"), hello("herald", "n2", 1));
        let mut c = start(&pki.configs("n3"), hello("herald", "n3", 1));
        let all = vec![a.addr(), b.addr(), c.addr()];
        a.transport.set_peers(all.clone());
        b.transport.set_peers(all.clone());
        c.transport.set_peers(all);
        for node in [&mut a, &mut b, &mut c] {
            let mut up = Vec::new();
            for _ in 0..2 {
                match node.next().await {
                    Event::PeerUp { node: peer, .. } => up.push(peer),
                    other => panic!("{}: {other:?}", node.id),
                }
            }
            up.sort();
            assert_eq!(up.len(), 2);
            assert_ne!(up[0], up[1]);
        }
        for node in [&mut a, &mut b, &mut c] {
            node.expect_quiet(QUIET).await;
            assert_eq!(node.transport.connected().len(), 2, "{}", node.id);
        }
        a.stop().await;
        b.stop().await;
        c.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn when_both_dial_one_connection_stays() {
        let pki = Pki::new("quic-both");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        let mut b = start(&pki.configs("n2"), hello("herald", "n2", 1));
        // b is the larger id and would wait; make it dial anyway, like a
        // node with another rule, racing a's own dial.
        let b_token = b.transport.inner.stop.child_token();
        b.transport.inner.tasks.spawn(dial_loop(
            b.transport.inner.clone(),
            a.id.clone(),
            a.generation,
            a.transport.local_addr(),
            b_token,
        ));
        a.transport.set_peers(vec![b.addr()]);
        b.transport.set_peers(vec![a.addr()]);

        // Both may see the losing connection come and go; once settled,
        // each has one link, and it is the one a (the smaller id) dialed.
        let deadline = Instant::now() + WAIT;
        loop {
            let a_link = a
                .transport
                .inner
                .read()
                .links
                .get(&b.id)
                .map(|l| l.dialed_by_us);
            let b_link = b
                .transport
                .inner
                .read()
                .links
                .get(&a.id)
                .map(|l| l.dialed_by_us);
            if a_link == Some(true) && b_link == Some(false) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never settled: {a_link:?} {b_link:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // b's extra dial loop keeps trying; it must never win again.
        tokio::time::sleep(QUIET * 2).await;
        assert_eq!(
            a.transport
                .inner
                .read()
                .links
                .get(&b.id)
                .map(|l| l.dialed_by_us),
            Some(true)
        );
        assert_eq!(
            b.transport
                .inner
                .read()
                .links
                .get(&a.id)
                .map(|l| l.dialed_by_us),
            Some(false)
        );
        let (a_id, b_id) = (a.id.clone(), b.id.clone());
        for (node, peer) in [(&mut a, b_id), (&mut b, a_id.clone())] {
            // Every PeerDown follows a PeerUp; the last event is a PeerUp.
            let mut up = false;
            while let Ok(event) = node.events.try_recv() {
                match event {
                    Event::PeerUp { node: p, .. } if p == peer && !up => up = true,
                    Event::PeerDown { node: p } if p == peer && up => up = false,
                    other => panic!("{}: out of order: {other:?}", node.id),
                }
            }
            assert!(up, "{}: not up at the end", node.id);
        }
        a.transport.send(&b.id, frame(0)).expect("send");
        b.expect_frames(&a_id, 1).await;
        a.stop().await;
        b.stop().await;
    }

    #[test]
    fn the_tie_break_agrees_on_both_ends() {
        // (existing, incoming) connections between n1 (smaller) and n2,
        // described by who dialed them; each end sees "dialed by us" from
        // its own side.
        for (old_by_n1, new_by_n1) in [(true, false), (false, true), (true, true), (false, false)] {
            let n1 = admit(Some((5, old_by_n1)), 5, new_by_n1, true);
            let n2 = admit(Some((5, !old_by_n1)), 5, !new_by_n1, false);
            assert_eq!(
                matches!(n1, Admit::Replace),
                matches!(n2, Admit::Replace),
                "old by n1: {old_by_n1}, new by n1: {new_by_n1}"
            );
        }
        assert_eq!(admit(Some((5, false)), 5, true, true), Admit::Replace);
        assert!(matches!(
            admit(Some((5, true)), 5, false, true),
            Admit::Refuse(_)
        ));
        assert_eq!(admit(Some((5, true)), 6, false, true), Admit::Replace);
        assert!(matches!(
            admit(Some((6, false)), 5, false, true),
            Admit::Refuse(_)
        ));
        assert_eq!(admit(None, 1, false, false), Admit::New);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_generation_replaces_the_connection() {
        let pki = Pki::new("quic-gen");
        let b_configs = pki.configs("n2");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        let mut b = start(&b_configs, hello("herald", "n2", 1));
        connect(&mut a, &mut b).await;

        // n2 restarts elsewhere while its old process still runs; n1 (the
        // dialer) learns the new generation from membership.
        let mut b2 = start(&b_configs, hello("herald", "n2", 2));
        b2.transport.set_peers(vec![a.addr()]);
        a.transport.set_peers(vec![b2.addr()]);
        let b_id = b.id.clone();
        a.expect_down(&b_id).await;
        a.expect_up(&b2).await;
        b2.expect_up(&a).await;
        b.expect_down(&a.id.clone()).await;
        assert_eq!(a.transport.connected(), vec![(b_id.clone(), 2)]);
        a.transport.send(&b_id, frame(0)).expect("send");
        let a_id = a.id.clone();
        b2.expect_frames(&a_id, 1).await;
        b.expect_quiet(QUIET).await;
        a.stop().await;
        b.stop().await;
        b2.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_dialer_replaces_its_old_connection() {
        let pki = Pki::new("quic-gen-dialer");
        let z_configs = pki.configs("n0");
        let mut z = start(&z_configs, hello("herald", "n0", 1));
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        connect(&mut z, &mut a).await;

        // n0 (which dials n1) restarts; n1's membership has not caught up.
        let mut z2 = start(&z_configs, hello("herald", "n0", 2));
        z2.transport.set_peers(vec![a.addr()]);
        let z_id = z.id.clone();
        a.expect_down(&z_id).await;
        a.expect_up(&z2).await;
        z2.expect_up(&a).await;
        z.expect_down(&a.id.clone()).await;
        assert_eq!(a.transport.connected(), vec![(z_id, 2)]);
        a.stop().await;
        z.stop().await;
        z2.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_a_certificate_from_the_cluster_ca_never_connects() {
        let pki = Pki::new("quic-ca");
        let other = Pki::new("quic-ca-other");
        let mut good = start(&pki.configs("n1"), hello("herald", "n1", 1));
        // Entirely from another CA: n0 dials n1, n1 dials n2.
        let mut stranger_dialer = start(&other.configs("n0"), hello("herald", "n0", 1));
        let mut stranger_dialed = start(&other.configs("n2"), hello("herald", "n2", 1));
        // Trusts the cluster CA (so it accepts n1 as a server) but holds a
        // certificate from the other one: only client verification stops it.
        let files = other.node_files("m0");
        let mixed_configs = TlsMaterial::load_unverified(&pki.ca(), &files.cert, &files.key)
            .expect("load")
            .quic_configs(Duration::from_millis(500), Duration::from_secs(5))
            .expect("configs");
        let mut mixed = start(&mixed_configs, hello("herald", "m0", 1));

        good.transport.set_peers(vec![
            stranger_dialer.addr(),
            stranger_dialed.addr(),
            mixed.addr(),
        ]);
        for node in [&stranger_dialer, &stranger_dialed, &mixed] {
            node.transport.set_peers(vec![good.addr()]);
        }

        // A client with no certificate at all.
        let roots = {
            let mut roots = rustls::RootCertStore::empty();
            for ca in tls::load_certs(&pki.ca(), "ca").expect("ca") {
                roots.add(ca).expect("root");
            }
            Arc::new(roots)
        };
        let mut anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
        anonymous.alpn_protocols = vec![protocol::peer::PEER_ALPN.to_vec()];
        let anonymous = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(anonymous).expect("quic"),
        ));
        let client =
            quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("client");
        let attempt = async {
            let connection = client
                .connect_with(anonymous, good.transport.local_addr(), "n1")?
                .await?;
            let (send, recv) = connection.open_bi().await?;
            write_hello(send, &hello("herald", "n7", 1)).await?;
            read_hello(recv).await
        };
        let result = timeout(WAIT, attempt).await.expect("bounded");
        assert!(result.is_err(), "an anonymous client got a hello");

        good.expect_quiet(QUIET * 2).await;
        for node in [&mut stranger_dialer, &mut stranger_dialed, &mut mixed] {
            node.expect_quiet(Duration::from_millis(100)).await;
            assert!(node.transport.connected().is_empty());
        }
        assert!(good.transport.connected().is_empty());
        client.close(VarInt::from_u32(0), b"");
        good.stop().await;
        stranger_dialer.stop().await;
        stranger_dialed.stop().await;
        mixed.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_cluster_or_version_is_refused() {
        let pki = Pki::new("quic-cluster");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        let mut b = start(&pki.configs("n2"), hello("other", "n2", 1));
        let mut newer = hello("herald", "n0", 1);
        newer.version += 1;
        let mut c = start(&pki.configs("n0"), newer);
        a.transport.set_peers(vec![b.addr(), c.addr()]);
        b.transport.set_peers(vec![a.addr()]);
        c.transport.set_peers(vec![a.addr()]);
        a.expect_quiet(QUIET).await;
        b.expect_quiet(Duration::from_millis(100)).await;
        c.expect_quiet(Duration::from_millis(100)).await;
        a.stop().await;
        b.stop().await;
        c.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hello_that_does_not_match_the_certificate_is_refused() {
        let pki = Pki::new("quic-impostor");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        // Holds n2's certificate but claims to be n0 (and so dials n1).
        let n2 = pki.configs("n2");
        let (tx, _rx) = mpsc::channel(16);
        let refused = QuicTransport::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &n2,
            hello("herald", "n0", 1),
            tx,
            SEND_QUEUE_FRAMES,
        );
        assert!(matches!(refused, Err(QuicError::IdentityMismatch { .. })));
        let mut impostor = start(&n2, hello("herald", "n0", 1));
        impostor.transport.set_peers(vec![a.addr()]);
        a.transport.set_peers(vec![impostor.addr()]);
        a.expect_quiet(QUIET).await;
        impostor.expect_quiet(Duration::from_millis(100)).await;
        assert!(a.transport.connected().is_empty());
        a.stop().await;
        impostor.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn set_peers_without_a_node_closes_its_connection() {
        let pki = Pki::new("quic-remove");
        let mut a = start(&pki.configs("n1"), hello("herald", "n1", 1));
        let mut b = start(&pki.configs("n2"), hello("herald", "n2", 1));
        connect(&mut a, &mut b).await;
        let (a_id, b_id) = (a.id.clone(), b.id.clone());

        // The dialed side drops the dialer: the dialer keeps re-dialing (it
        // still lists n2) and is refused each time.
        b.transport.set_peers(Vec::new());
        b.expect_down(&a_id).await;
        a.expect_down(&b_id).await;
        a.expect_quiet(QUIET).await;
        b.expect_quiet(Duration::from_millis(100)).await;
        assert!(matches!(
            b.transport.send(&a_id, frame(0)),
            Err(TransportError::NotConnected(_))
        ));

        // Listed again: the dialer gets in.
        b.transport.set_peers(vec![a.addr()]);
        a.expect_up(&b).await;
        b.expect_up(&a).await;

        // The dialer drops the dialed: nobody dials any more.
        a.transport.set_peers(Vec::new());
        a.expect_down(&b_id).await;
        b.expect_down(&a_id).await;
        a.expect_quiet(QUIET).await;
        b.expect_quiet(Duration::from_millis(100)).await;
        a.stop().await;
        b.stop().await;
    }

    #[test]
    fn hello_checks_name_the_reason() {
        let local = hello("herald", "n1", 1);
        let ok = hello("herald", "n2", 3);
        assert_eq!(check_hello(&local, "n2", &ok, Some(("n2", 3))), Ok(()));
        let close = |h: &Hello, cert: &str, dialed| {
            check_hello(&local, cert, h, dialed).map_err(|r| r.close)
        };
        let mut v = ok.clone();
        v.version += 1;
        assert_eq!(close(&v, "n2", None), Err(Close::Version));
        assert_eq!(close(&hello("x", "n2", 3), "n2", None), Err(Close::Cluster));
        assert_eq!(close(&ok, "n3", None), Err(Close::Identity));
        assert_eq!(
            close(&hello("herald", "n1", 3), "n1", None),
            Err(Close::Identity)
        );
        assert_eq!(close(&ok, "n2", Some(("n4", 3))), Err(Close::Identity));
        assert_eq!(close(&ok, "n2", Some(("n2", 4))), Err(Close::Stale));
    }
}
