//! Cluster membership: which nodes exist, in which state, at which addresses.
//!
//! Each node gossips a handful of small key-values about itself over UDP
//! with chitchat (scuttlebutt anti-entropy plus a failure detector):
//! `client`, `admin` and `cluster` addresses, its `state`, its client
//! `conns` count, and whether a link of its is `congested`.
//! [`Membership::watch`] turns chitchat's view into a sorted, deduplicated
//! list of [`Member`]s and republishes it whenever anything a caller can see
//! changes (liveness, state, addresses, load, congestion). Only nodes with
//! the same `cluster.name` ever exchange state (chitchat's `cluster_id`).
//!
//! Gossip is unauthenticated: it decides who is listed, not who is trusted.
//! Node-to-node traffic is authenticated separately (mutual TLS over QUIC).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::transport::{Socket, Transport, UdpSocket};
use chitchat::{
    spawn_chitchat, Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    ProtocolVersion,
};
use tokio::sync::{oneshot, watch, Mutex, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::config::Config;

/// A node's id, as gossiped and shown in `/v1/cluster`.
pub type NodeId = crate::owner::NodeId;

/// Gossiped keys. Every node sees every key of every node, so names and
/// values stay short.
const KEY_CLIENT: &str = "client";
const KEY_ADMIN: &str = "admin";
const KEY_CLUSTER: &str = "cluster";
const KEY_STATE: &str = "state";
const KEY_CONNS: &str = "conns";
const KEY_CONGESTED: &str = "congested";

/// A resolved cluster address is looked up again this often, so a member
/// whose name moves to another IP (a container restarted) is followed.
const DNS_REFRESH: Duration = Duration::from_secs(30);
/// An address that did not resolve is retried this soon: in compose, a
/// container's name often resolves only a moment after it started gossiping.
const DNS_RETRY: Duration = Duration::from_secs(1);
/// Bound on one lookup, so a slow resolver delays the view at most this long.
const DNS_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on looking up this node's own advertised name at start.
const ADVERTISE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// On a graceful leave, the `dead` state is pushed to every live peer this
/// many times (UDP may drop a datagram) before gossip stops.
const LEAVE_ROUNDS: u32 = 2;
/// Longest pause between leave rounds: enough for a SYN/SYN-ACK/ACK round
/// trip on a LAN without holding up shutdown.
const LEAVE_PAUSE: Duration = Duration::from_millis(200);
/// A node chitchat has heard of but never judged live is left out of the
/// view for at least this long: chitchat needs a few heartbeats before it
/// calls a new node live, and listing a joining node as dead in the meantime
/// would be a false alarm. After it, the node is listed as dead (it is
/// known only from others' gossip and has not been heard from).
const SETTLE_MIN: Duration = Duration::from_secs(3);
/// The same, in gossip intervals, for slow gossip settings.
const SETTLE_INTERVALS: u32 = 12;

/// A member's state as it gossips it, or `Dead` once the failure detector
/// (or its own graceful leave) says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Joining,
    Ready,
    Draining,
    Dead,
}

impl MemberState {
    /// The gossiped (and JSON) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Ready => "ready",
            MemberState::Draining => "draining",
            MemberState::Dead => "dead",
        }
    }

    fn parse(text: &str) -> Option<MemberState> {
        match text {
            "joining" => Some(MemberState::Joining),
            "ready" => Some(MemberState::Ready),
            "draining" => Some(MemberState::Draining),
            "dead" => Some(MemberState::Dead),
            _ => None,
        }
    }
}

/// One member of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub node: NodeId,
    pub generation: u64,
    /// `Dead` when chitchat considers it dead or it left.
    pub state: MemberState,
    /// "host:port" as advertised.
    pub client_addr: String,
    pub admin_addr: String,
    /// QUIC "host:port" as advertised.
    pub cluster_addr: String,
    /// `cluster_addr` resolved (looked up here, cached and refreshed);
    /// `None` while it does not resolve.
    pub cluster_socket: Option<SocketAddr>,
    pub gossip_addr: SocketAddr,
    /// Client connections, as the member last gossiped them.
    pub connections: u64,
    /// The member gossips a link of its as backed up.
    pub congested: bool,
    pub is_self: bool,
}

/// What this node tells the others about itself.
#[derive(Debug, Clone)]
pub struct SelfAdvert {
    pub node: NodeId,
    pub generation: u64,
    pub client_addr: String,
    pub admin_addr: String,
    pub cluster_addr: String,
}

/// Why membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot listen for gossip on {addr}/udp: {source}")]
    Bind {
        addr: SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot resolve the advertised gossip host {host:?}: {reason}")]
    Advertise { host: String, reason: String },
    #[error("invalid setting {key}: {message}")]
    Invalid {
        key: &'static str,
        message: &'static str,
    },
    #[error("cannot start gossip: {0}")]
    Start(Box<dyn std::error::Error + Send + Sync>),
}

/// A running membership: gossip plus the task that keeps the view current.
pub struct Membership {
    handle: ChitchatHandle,
    chitchat: Arc<Mutex<Chitchat>>,
    view: watch::Receiver<Arc<Vec<Member>>>,
    /// Wakes the view task after a local change, so this node's own entry
    /// is current at once rather than after the next tick.
    nudge: Arc<Notify>,
    gossip_interval: Duration,
    /// Dropping it (with the membership) ends the view task.
    _stop: oneshot::Sender<()>,
}

impl Membership {
    /// Binds gossip (UDP) on `config.gossip.listen` and starts chitchat with
    /// cluster_id = `config.cluster.name`, seeds = `config.cluster.seeds`,
    /// gossip interval and phi threshold from the config, initial state
    /// `Joining`.
    pub async fn start(config: &Config, me: SelfAdvert) -> Result<Membership, MembershipError> {
        let gossip = &config.gossip;
        if gossip.interval.is_zero() {
            // tokio's interval (used by chitchat too) panics on a zero period.
            return Err(MembershipError::Invalid {
                key: "gossip.interval",
                message: "must be above zero",
            });
        }
        // Bind here rather than inside chitchat, so that a port of 0 works:
        // chitchat must advertise the port actually bound.
        let socket = UdpSocket::open(gossip.listen)
            .await
            .map_err(|e| MembershipError::Bind {
                addr: gossip.listen,
                source: e.into(),
            })?;
        let bound = socket.local_addr().map_err(|e| MembershipError::Bind {
            addr: gossip.listen,
            source: e.into(),
        })?;
        let advertise = gossip_advertise_addr(config, bound).await?;

        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(me.node.clone(), me.generation, advertise),
            cluster_id: config.cluster.name.clone(),
            gossip_interval: gossip.interval,
            listen_addr: bound,
            seed_nodes: config.cluster.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: gossip.phi_threshold,
                // The prior for the mean heartbeat interval of a new node. The
                // default (5 s) makes a node that dies soon after joining take
                // tens of seconds to be noticed; the gossip interval is the
                // right prior on a LAN.
                initial_interval: gossip.interval,
                dead_node_grace_period: gossip.dead_grace,
                ..FailureDetectorConfig::default()
            },
            // Tombstones of deleted keys; nothing here deletes keys, so this
            // only has to be long enough to be harmless.
            marked_for_deletion_grace_period: gossip.dead_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
            // V1 only compresses digests, which stay small in clusters of a
            // few nodes; V0 is readable by every chitchat version.
            protocol_version: ProtocolVersion::V0,
        };
        let initial = vec![
            (KEY_CLIENT.to_owned(), me.client_addr.clone()),
            (KEY_ADMIN.to_owned(), me.admin_addr.clone()),
            (KEY_CLUSTER.to_owned(), me.cluster_addr.clone()),
            (
                KEY_STATE.to_owned(),
                MemberState::Joining.as_str().to_owned(),
            ),
            (KEY_CONNS.to_owned(), "0".to_owned()),
        ];
        let transport = Prebound(std::sync::Mutex::new(Some(socket)));
        let handle = spawn_chitchat(chitchat_config, initial, &transport)
            .await
            .map_err(|e| MembershipError::Start(e.into()))?;
        info!(
            node_id = %me.node,
            generation = me.generation,
            gossip = %bound,
            advertise = %advertise,
            cluster = %config.cluster.name,
            seeds = ?config.cluster.seeds,
            "gossip started"
        );

        let chitchat = handle.chitchat();
        let settle = SETTLE_MIN.max(gossip.interval * SETTLE_INTERVALS);
        let mut tracker = Tracker::new(handle.chitchat_id().clone(), settle);
        // The first view is built before returning, so `watch()` always
        // holds at least this node.
        let (live, first) = {
            let guard = chitchat.lock().await;
            (guard.live_nodes_watcher(), snapshot(&guard))
        };
        let first = tracker.build(first).await;
        let (tx, view) = watch::channel(Arc::new(first));
        let nudge = Arc::new(Notify::new());
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(run_view(
            chitchat.clone(),
            tracker,
            tx,
            live,
            nudge.clone(),
            gossip.interval,
            stop_rx,
        ));
        let terminated = handle.termination_watcher();
        tokio::spawn(async move {
            if let Err(e) = terminated.await {
                error!(error = %e, "gossip stopped: this node is cut off from the cluster");
            }
        });

        Ok(Membership {
            handle,
            chitchat,
            view,
            nudge,
            gossip_interval: gossip.interval,
            _stop: stop_tx,
        })
    }

    /// Every member known, self included, dead ones with state `Dead` (until
    /// the dead grace passes); sorted by node id; deduplicated by node id
    /// keeping the highest generation (this node's own entry always wins for
    /// its id). Updated whenever gossip changes anything visible here.
    pub fn watch(&self) -> watch::Receiver<Arc<Vec<Member>>> {
        self.view.clone()
    }

    /// Gossips this node's state.
    pub async fn set_state(&self, state: MemberState) {
        self.set(KEY_STATE, state.as_str()).await;
    }

    /// Gossips this node's client connection count. Each change is one
    /// gossiped update: callers should report it periodically, not per
    /// connection.
    pub async fn set_connections(&self, connections: u64) {
        self.set(KEY_CONNS, &connections.to_string()).await;
    }

    /// Gossips whether a link of this node is backed up.
    pub async fn set_congested(&self, congested: bool) {
        self.set(KEY_CONGESTED, if congested { "1" } else { "0" })
            .await;
    }

    async fn set(&self, key: &str, value: &str) {
        // chitchat ignores a set to the value already held, so unchanged
        // values cost nothing on the wire.
        self.chitchat.lock().await.self_node_state().set(key, value);
        self.nudge.notify_one();
    }

    /// Leaves gracefully and stops gossip. The caller gossips `Draining`
    /// first; this gossips `Dead` straight to every live peer, so they list
    /// this node as dead at once instead of after failure detection.
    pub async fn shutdown(self) {
        let Membership {
            handle,
            chitchat,
            nudge,
            gossip_interval,
            _stop,
            ..
        } = self;
        let peers: Vec<SocketAddr> = {
            let mut guard = chitchat.lock().await;
            guard
                .self_node_state()
                .set(KEY_STATE, MemberState::Dead.as_str());
            let me = guard.self_chitchat_id().clone();
            guard
                .live_nodes()
                .filter(|id| **id != me)
                .map(|id| id.gossip_advertise_addr)
                .collect()
        };
        nudge.notify_one();
        // A SYN to a peer makes it answer with its digest, to which our
        // (still running) server replies with the delta holding `dead`.
        let pause = gossip_interval.min(LEAVE_PAUSE);
        for _ in 0..LEAVE_ROUNDS {
            for peer in &peers {
                if let Err(e) = handle.gossip(*peer) {
                    debug!(error = %e, "gossip already stopped");
                }
            }
            tokio::time::sleep(pause).await;
        }
        if let Err(e) = handle.shutdown().await {
            warn!(error = %e, "gossip did not stop cleanly");
        }
        info!(peers = peers.len(), "left the cluster");
    }
}

/// The advertised host: `cluster.advertise`, else the listen host (of
/// `cluster.listen`), else (listening on 0.0.0.0 or ::) the host name. An
/// IPv6 address comes bracketed, ready to have ":port" appended.
pub fn advertised_host(config: &Config) -> String {
    host_for(config, config.cluster.listen.ip())
}

/// The generation for this start: the wall clock in milliseconds, so that a
/// restarted node's new key-values win over its previous life's (peers
/// ignore a restart that reuses a generation). Strictly increasing within
/// one process.
pub fn new_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last.saturating_add(1)))
        })
        .unwrap_or_else(|last| last);
    now.max(previous.saturating_add(1))
}

/// `cluster.advertise` (bracketed if a bare IPv6 address), else `listen_ip`
/// unless unspecified, else the host name.
fn host_for(config: &Config, listen_ip: IpAddr) -> String {
    if let Some(host) = config.cluster.advertise.as_deref().map(str::trim) {
        if !host.is_empty() {
            return match host.parse::<IpAddr>() {
                Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
                _ => host.to_owned(),
            };
        }
    }
    match listen_ip {
        ip if ip.is_unspecified() => host_name(),
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Where peers send gossip to this node: the advertised host (for gossip,
/// the gossip listen host stands in for the cluster one) at the bound port.
/// A name is looked up once: chitchat identifies nodes by socket address.
async fn gossip_advertise_addr(
    config: &Config,
    bound: SocketAddr,
) -> Result<SocketAddr, MembershipError> {
    let host = host_for(config, bound.ip());
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, bound.port()));
    }
    let failed = |reason: String| MembershipError::Advertise {
        host: host.clone(),
        reason,
    };
    let found = tokio::time::timeout(
        ADVERTISE_LOOKUP_TIMEOUT,
        tokio::net::lookup_host((bare, bound.port())),
    )
    .await
    .map_err(|_| failed("lookup timed out".to_owned()))?
    .map_err(|e| failed(e.to_string()))?
    .collect::<Vec<_>>();
    // Prefer the family we listen on: an IPv6 answer is useless to a socket
    // bound to 0.0.0.0.
    found
        .iter()
        .find(|a| a.is_ipv4() == bound.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| failed("no address found".to_owned()))
}

/// The machine's host name ("localhost" if it has none).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its length; gethostname
    // NUL-terminates within it or truncates, and we stop at the first NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_owned(),
        _ => "localhost".to_owned(),
    }
}

/// A chitchat transport handing over a socket bound before chitchat started
/// (chitchat's own `UdpTransport` binds inside `spawn_chitchat`, leaving no
/// way to learn a port picked by the OS).
struct Prebound(std::sync::Mutex<Option<UdpSocket>>);

// Written out by hand: the trait is declared with `async_trait`, which this
// crate does not depend on; this is the signature it expands to.
impl Transport for Prebound {
    fn open<'a, 'b>(
        &'a self,
        listen_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<Box<dyn Socket>>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let socket = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        Box::pin(async move {
            let socket = match socket {
                Some(socket) => socket,
                // Opened twice: only possible if chitchat changes how it
                // starts; binding again is the honest fallback.
                None => UdpSocket::open(listen_addr).await?,
            };
            Ok(Box::new(socket) as Box<dyn Socket>)
        })
    }
}

/// One node as chitchat holds it, copied out so the lock is held briefly.
struct Seen {
    id: ChitchatId,
    live: bool,
    client: Option<String>,
    admin: Option<String>,
    cluster: Option<String>,
    state: Option<String>,
    conns: Option<String>,
    congested: Option<String>,
}

fn snapshot(chitchat: &Chitchat) -> Vec<Seen> {
    let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
    chitchat
        .node_states()
        .iter()
        .map(|(id, node)| {
            let get = |key| node.get(key).map(str::to_owned);
            Seen {
                id: id.clone(),
                live: live.contains(id),
                client: get(KEY_CLIENT),
                admin: get(KEY_ADMIN),
                cluster: get(KEY_CLUSTER),
                state: get(KEY_STATE),
                conns: get(KEY_CONNS),
                congested: get(KEY_CONGESTED),
            }
        })
        .collect()
}

/// Keeps the view current until the membership is dropped or shut down.
async fn run_view(
    chitchat: Arc<Mutex<Chitchat>>,
    mut tracker: Tracker,
    tx: watch::Sender<Arc<Vec<Member>>>,
    mut live: watch::Receiver<BTreeMap<ChitchatId, chitchat::NodeState>>,
    nudge: Arc<Notify>,
    interval: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    // chitchat signals live-set and version changes of live nodes, but not
    // a dead node's last words nor everything else we show, so the state is
    // also read every gossip interval; publishing only on a real change
    // keeps watchers quiet.
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut live_open = true;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticker.tick() => {}
            _ = nudge.notified() => {}
            changed = live.changed(), if live_open => live_open = changed.is_ok(),
        }
        let seen = snapshot(&*chitchat.lock().await);
        let members = tracker.build(seen).await;
        tx.send_if_modified(|current| {
            if **current == members {
                return false;
            }
            log_changes(current, &members);
            *current = Arc::new(members);
            true
        });
    }
}

/// Logs joins, state changes and departures, one line per member.
fn log_changes(old: &[Member], new: &[Member]) {
    let before: HashMap<&str, &Member> = old.iter().map(|m| (&*m.node, m)).collect();
    let after: HashSet<&str> = new.iter().map(|m| &*m.node).collect();
    for m in new {
        match before.get(&*m.node) {
            Some(o) if o.state == m.state && o.generation == m.generation => {}
            _ => info!(
                node_id = %m.node,
                generation = m.generation,
                state = m.state.as_str(),
                cluster = %m.cluster_addr,
                "member"
            ),
        }
    }
    for m in old.iter().filter(|m| !after.contains(&*m.node)) {
        info!(node_id = %m.node, generation = m.generation, "member forgotten");
    }
}

/// Turns chitchat snapshots into the published list.
struct Tracker {
    self_id: ChitchatId,
    settle: Duration,
    /// When each node (by chitchat id) was first seen, to settle newcomers.
    first_seen: HashMap<ChitchatId, Instant>,
    /// Nodes chitchat has judged live at least once.
    ever_live: HashSet<ChitchatId>,
    resolver: Resolver,
}

impl Tracker {
    fn new(self_id: ChitchatId, settle: Duration) -> Tracker {
        Tracker {
            self_id,
            settle,
            first_seen: HashMap::new(),
            ever_live: HashSet::new(),
            resolver: Resolver::default(),
        }
    }

    async fn build(&mut self, seen: Vec<Seen>) -> Vec<Member> {
        let now = Instant::now();
        let present: HashSet<&ChitchatId> = seen.iter().map(|s| &s.id).collect();
        self.first_seen.retain(|id, _| present.contains(id));
        self.ever_live.retain(|id| present.contains(id));
        // A new chitchat id (a start or restart) may come with a name that
        // now points elsewhere: look its cluster address up afresh.
        let mut fresh = HashSet::new();
        for s in &seen {
            if !self.first_seen.contains_key(&s.id) {
                self.first_seen.insert(s.id.clone(), now);
                if let Some(addr) = &s.cluster {
                    fresh.insert(addr.clone());
                }
            }
            if s.live {
                self.ever_live.insert(s.id.clone());
            }
        }
        self.resolver
            .refresh(seen.iter().filter_map(|s| s.cluster.as_deref()), &fresh)
            .await;

        let mut by_node: BTreeMap<NodeId, Member> = BTreeMap::new();
        for s in seen {
            let is_self = s.id == self.self_id;
            // A node whose key-values have not all arrived yet cannot be
            // described; it shows up with the next delta.
            let (Some(client_addr), Some(admin_addr), Some(cluster_addr), Some(gossiped)) =
                (s.client, s.admin, s.cluster, s.state)
            else {
                continue;
            };
            // An unknown state (a newer node's) is not a promise to serve.
            let gossiped = MemberState::parse(&gossiped).unwrap_or(MemberState::Joining);
            let state = if is_self || s.live {
                gossiped
            } else if self.ever_live.contains(&s.id)
                || self
                    .first_seen
                    .get(&s.id)
                    .is_some_and(|t| now.duration_since(*t) >= self.settle)
            {
                MemberState::Dead
            } else {
                continue;
            };
            let member = Member {
                node: s.id.node_id.clone(),
                generation: s.id.generation_id,
                state,
                cluster_socket: self.resolver.get(&cluster_addr),
                client_addr,
                admin_addr,
                cluster_addr,
                gossip_addr: s.id.gossip_advertise_addr,
                connections: s.conns.and_then(|c| c.parse().ok()).unwrap_or(0),
                congested: s.congested.as_deref() == Some("1"),
                is_self,
            };
            match by_node.get(&member.node) {
                Some(kept) if (kept.is_self, kept.generation) >= (is_self, member.generation) => {}
                _ => {
                    by_node.insert(member.node.clone(), member);
                }
            }
        }
        by_node.into_values().collect()
    }
}

/// Cached lookups of members' cluster addresses.
#[derive(Default)]
struct Resolver {
    cache: HashMap<String, Resolved>,
}

struct Resolved {
    addr: Option<SocketAddr>,
    /// `None` for an IP literal: nothing to refresh.
    next: Option<Instant>,
}

impl Resolver {
    /// Makes sure every wanted address has a current answer, looking up (all
    /// at once, each bounded) the new, stale and `forced` ones, and forgets
    /// addresses no longer wanted.
    async fn refresh<'a>(
        &mut self,
        wanted: impl Iterator<Item = &'a str>,
        forced: &HashSet<String>,
    ) {
        let now = Instant::now();
        let wanted: HashSet<&str> = wanted.collect();
        self.cache.retain(|addr, _| wanted.contains(addr.as_str()));
        let mut todo = Vec::new();
        for addr in wanted {
            if let Ok(literal) = addr.parse::<SocketAddr>() {
                self.cache.entry(addr.to_owned()).or_insert(Resolved {
                    addr: Some(literal),
                    next: None,
                });
                continue;
            }
            let due = match self.cache.get(addr) {
                None => true,
                Some(r) => forced.contains(addr) || r.next.is_some_and(|next| next <= now),
            };
            if due {
                todo.push(addr.to_owned());
            }
        }
        if todo.is_empty() {
            return;
        }
        let answers = futures_util::future::join_all(todo.into_iter().map(|addr| async move {
            let found =
                match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host(&addr)).await {
                    Ok(Ok(mut found)) => found.next(),
                    Ok(Err(e)) => {
                        debug!(addr = %addr, error = %e, "cluster address does not resolve");
                        None
                    }
                    Err(_) => {
                        debug!(addr = %addr, "cluster address lookup timed out");
                        None
                    }
                };
            (addr, found)
        }))
        .await;
        let now = Instant::now();
        for (addr, found) in answers {
            let entry = self.cache.entry(addr).or_insert(Resolved {
                addr: None,
                next: None,
            });
            match found {
                Some(found) => {
                    entry.addr = Some(found);
                    entry.next = Some(now + DNS_REFRESH);
                }
                // A failed refresh keeps the last good answer: a resolver
                // hiccup should not make a live member unreachable.
                None => entry.next = Some(now + DNS_RETRY),
            }
        }
    }

    fn get(&self, addr: &str) -> Option<SocketAddr> {
        self.cache.get(addr).and_then(|r| r.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bound on every wait; generous because tests share two cores with
    /// concurrent builds.
    const LIMIT: Duration = Duration::from_secs(30);

    type View = Arc<Vec<Member>>;

    fn config(cluster: &str, id: &str, seeds: Vec<String>) -> Config {
        let mut config = Config::default();
        config.node.id = id.to_owned();
        config.cluster.name = cluster.to_owned();
        config.cluster.seeds = seeds;
        config.gossip.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config
    }

    /// Distinct, recognisable addresses per node (nothing listens there).
    fn advert(id: &str, generation: u64, n: u16) -> SelfAdvert {
        SelfAdvert {
            node: Arc::from(id),
            generation,
            client_addr: format!("127.0.0.1:{}", 17_400 + n),
            admin_addr: format!("127.0.0.1:{}", 17_480 + n),
            cluster_addr: format!("127.0.0.1:{}", 17_500 + n),
        }
    }

    async fn start(cluster: &str, id: &str, n: u16, seeds: Vec<String>) -> Membership {
        Membership::start(&config(cluster, id, seeds), advert(id, new_generation(), n))
            .await
            .expect("membership starts")
    }

    /// This node's gossip address, as a seed for others.
    fn seed_of(m: &Membership) -> String {
        let view = m.watch().borrow().clone();
        let me = view.iter().find(|m| m.is_self).expect("self is listed");
        me.gossip_addr.to_string()
    }

    /// Waits (bounded) until the view satisfies `pred`; panics with the last
    /// view otherwise.
    async fn wait_for(m: &Membership, what: &str, pred: impl Fn(&[Member]) -> bool) -> View {
        let mut rx = m.watch();
        let result = tokio::time::timeout(LIMIT, async {
            loop {
                let view = rx.borrow_and_update().clone();
                if pred(&view) {
                    return view;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        match result {
            Ok(view) => view,
            Err(_) => panic!(
                "timed out waiting for {what}; view: {:#?}",
                m.watch().borrow()
            ),
        }
    }

    fn state_of(view: &[Member], id: &str) -> Option<MemberState> {
        view.iter().find(|m| &*m.node == id).map(|m| m.state)
    }

    fn all_ready(view: &[Member], ids: &[&str]) -> bool {
        view.len() == ids.len()
            && ids
                .iter()
                .all(|id| state_of(view, id) == Some(MemberState::Ready))
    }

    #[test]
    fn states_round_trip() {
        for s in [
            MemberState::Joining,
            MemberState::Ready,
            MemberState::Draining,
            MemberState::Dead,
        ] {
            assert_eq!(MemberState::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).expect("serializes");
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(MemberState::parse("Ready"), None);
    }

    #[test]
    fn generations_increase() {
        let a = new_generation();
        let b = new_generation();
        assert!(b > a);
        // Milliseconds since the epoch: after 2020, before 2100.
        assert!(a > 1_577_836_800_000 && a < 4_102_444_800_000);
    }

    #[test]
    fn advertised_host_rules() {
        let mut c = Config::default();
        assert_eq!(advertised_host(&c), "127.0.0.1");
        c.cluster.listen = "[::1]:7401".parse().expect("addr");
        assert_eq!(advertised_host(&c), "[::1]");
        c.cluster.listen = "0.0.0.0:7401".parse().expect("addr");
        assert_eq!(advertised_host(&c), host_name());
        c.cluster.advertise = Some("herald-2".to_owned());
        assert_eq!(advertised_host(&c), "herald-2");
        c.cluster.advertise = Some("fd00::2".to_owned());
        assert_eq!(advertised_host(&c), "[fd00::2]");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zero_interval_is_refused() {
        let mut c = config("herald", "z", Vec::new());
        c.gossip.interval = Duration::ZERO;
        let err = Membership::start(&c, advert("z", 1, 0)).await.err();
        assert!(matches!(err, Some(MembershipError::Invalid { .. })));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_converge_and_follow_state() {
        let a = start("herald", "a", 1, Vec::new()).await;
        let seeds = vec![seed_of(&a)];
        let b = start("herald", "b", 2, seeds.clone()).await;
        let c = start("herald", "c", 3, seeds).await;
        let nodes = [&a, &b, &c];
        for m in nodes {
            m.set_state(MemberState::Ready).await;
        }
        let started = Instant::now();
        let mut views = Vec::new();
        for m in nodes {
            views.push(wait_for(m, "3 ready", |v| all_ready(v, &["a", "b", "c"])).await);
        }
        eprintln!("3 nodes converged to ready in {:?}", started.elapsed());

        let gossip: Vec<SocketAddr> = nodes
            .iter()
            .map(|m| {
                let v = m.watch().borrow().clone();
                v.iter()
                    .find(|x| x.is_self)
                    .map(|x| x.gossip_addr)
                    .expect("self")
            })
            .collect();
        for (i, view) in views.iter().enumerate() {
            let ids: Vec<&str> = view.iter().map(|m| &*m.node).collect();
            assert_eq!(ids, ["a", "b", "c"], "sorted by id");
            for (n, member) in view.iter().enumerate() {
                let expected = advert(&member.node, member.generation, n as u16 + 1);
                assert_eq!(member.client_addr, expected.client_addr);
                assert_eq!(member.admin_addr, expected.admin_addr);
                assert_eq!(member.cluster_addr, expected.cluster_addr);
                assert_eq!(
                    member.cluster_socket,
                    Some(expected.cluster_addr.parse().expect("addr"))
                );
                assert_eq!(member.gossip_addr, gossip[n]);
                assert_eq!(member.is_self, n == i);
                assert_eq!(member.connections, 0);
            }
        }

        b.set_state(MemberState::Draining).await;
        c.set_connections(42).await;
        for m in [&a, &c] {
            wait_for(m, "b draining", |v| {
                state_of(v, "b") == Some(MemberState::Draining)
            })
            .await;
        }
        wait_for(&a, "c's load", |v| {
            v.iter().any(|m| &*m.node == "c" && m.connections == 42)
        })
        .await;

        // A graceful leave is seen at once, not after failure detection.
        let left = Instant::now();
        b.shutdown().await;
        for m in [&a, &c] {
            wait_for(m, "b dead", |v| state_of(v, "b") == Some(MemberState::Dead)).await;
        }
        eprintln!(
            "graceful leave seen as dead {:?} after shutdown began",
            left.elapsed()
        );
        assert!(left.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_member_is_seen_dead() {
        let a = start("herald", "a", 1, Vec::new()).await;
        let seeds = vec![seed_of(&a)];
        let b = start("herald", "b", 2, seeds.clone()).await;
        let c = start("herald", "c", 3, seeds).await;
        for m in [&a, &b, &c] {
            m.set_state(MemberState::Ready).await;
        }
        for m in [&a, &b, &c] {
            wait_for(m, "3 ready", |v| all_ready(v, &["a", "b", "c"])).await;
        }
        // Let the failure detector learn the heartbeat rhythm, as in a
        // cluster that has been up for a while.
        tokio::time::sleep(Duration::from_secs(3)).await;

        // Dropping stops gossip without a word: what peers see of kill -9.
        let killed = Instant::now();
        drop(c);
        let mut seen = Vec::new();
        for m in [&a, &b] {
            wait_for(m, "c dead", |v| state_of(v, "c") == Some(MemberState::Dead)).await;
            seen.push(killed.elapsed());
        }
        eprintln!(
            "killed member seen dead after {:?} (gossip {:?}, phi {})",
            seen,
            Config::default().gossip.interval,
            Config::default().gossip.phi_threshold
        );
        assert!(killed.elapsed() < Duration::from_secs(10));
        // The survivors stay ready in each other's view.
        for m in [&a, &b] {
            let v = m.watch().borrow().clone();
            assert_eq!(state_of(&v, "a"), Some(MemberState::Ready));
            assert_eq!(state_of(&v, "b"), Some(MemberState::Ready));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_cluster_is_never_listed() {
        let a = start("herald", "a", 1, Vec::new()).await;
        // x seeds to a and a's member b seeds to x: both directions tried.
        let x = start("other", "x", 9, vec![seed_of(&a)]).await;
        let b = start("herald", "b", 2, vec![seed_of(&a), seed_of(&x)]).await;
        for m in [&a, &b, &x] {
            m.set_state(MemberState::Ready).await;
        }
        wait_for(&a, "a and b", |v| all_ready(v, &["a", "b"])).await;
        wait_for(&b, "a and b", |v| all_ready(v, &["a", "b"])).await;
        // Many gossip rounds later, still apart.
        let mut watches = [a.watch(), b.watch(), x.watch()];
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            for (i, rx) in watches.iter_mut().enumerate() {
                let v = rx.borrow_and_update().clone();
                let ids: Vec<&str> = v.iter().map(|m| &*m.node).collect();
                if i < 2 {
                    assert_eq!(ids, ["a", "b"]);
                } else {
                    assert_eq!(ids, ["x"]);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_replaces_the_older_generation() {
        let a = start("herald", "a", 1, Vec::new()).await;
        let seeds = vec![seed_of(&a)];
        let old = start("herald", "b", 2, seeds.clone()).await;
        a.set_state(MemberState::Ready).await;
        old.set_state(MemberState::Ready).await;
        let view = wait_for(&a, "a and b", |v| all_ready(v, &["a", "b"])).await;
        let old_generation = view
            .iter()
            .find(|m| &*m.node == "b")
            .map(|m| m.generation)
            .expect("b listed");

        // The new life starts while the old one still gossips (a crash and a
        // quick restart look like this to peers): one entry, the newer one.
        let mut newer = advert("b", new_generation(), 3);
        newer.generation = newer.generation.max(old_generation + 1);
        let second_generation = newer.generation;
        let new = Membership::start(&config("herald", "b", seeds), newer)
            .await
            .expect("restart starts");
        new.set_state(MemberState::Ready).await;
        let is_new = |v: &[Member]| {
            v.iter().filter(|m| &*m.node == "b").count() == 1
                && v.iter().any(|m| {
                    &*m.node == "b"
                        && m.generation == second_generation
                        && m.state == MemberState::Ready
                        && m.client_addr == "127.0.0.1:17403"
                })
        };
        wait_for(&a, "new b", is_new).await;
        wait_for(&new, "new b", |v| is_new(v) && all_ready(v, &["a", "b"])).await;

        // The old life dying does not take the new one down with it.
        drop(old);
        let mut rx = a.watch();
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline {
            let v = rx.borrow_and_update().clone();
            assert_eq!(v.len(), 2, "one entry per node id: {v:#?}");
            assert!(is_new(&v), "b is its newer generation: {v:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A graceful stop and a restart on the same gossip port (a restarted
        // container): the newest life replaces the one that left as dead.
        let port = new
            .watch()
            .borrow()
            .iter()
            .find(|m| m.is_self)
            .map(|m| m.gossip_addr);
        let port = port.expect("self listed");
        new.shutdown().await;
        wait_for(&a, "b left", |v| {
            state_of(v, "b") == Some(MemberState::Dead)
        })
        .await;
        let mut third = config("herald", "b", vec![seed_of(&a)]);
        third.gossip.listen = port;
        let newest = new_generation().max(second_generation + 1);
        let third = Membership::start(&third, advert("b", newest, 4))
            .await
            .expect("second restart starts");
        third.set_state(MemberState::Ready).await;
        wait_for(&a, "newest b", |v| {
            v.len() == 2
                && v.iter().any(|m| {
                    &*m.node == "b" && m.generation == newest && m.state == MemberState::Ready
                })
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_member_is_forgotten_after_the_grace() {
        let mut first = config("herald", "a", Vec::new());
        first.gossip.dead_grace = Duration::from_secs(2);
        let a = Membership::start(&first, advert("a", new_generation(), 1))
            .await
            .expect("starts");
        let mut second = config("herald", "b", vec![seed_of(&a)]);
        second.gossip.dead_grace = Duration::from_secs(2);
        let b = Membership::start(&second, advert("b", new_generation(), 2))
            .await
            .expect("starts");
        wait_for(&a, "b joining", |v| {
            state_of(v, "b") == Some(MemberState::Joining)
        })
        .await;
        let killed = Instant::now();
        drop(b);
        wait_for(&a, "b dead", |v| {
            state_of(v, "b") == Some(MemberState::Dead)
        })
        .await;
        eprintln!(
            "2 nodes: killed member seen dead after {:?}",
            killed.elapsed()
        );
        let dead = Instant::now();
        wait_for(&a, "b forgotten", |v| state_of(v, "b").is_none()).await;
        let listed = dead.elapsed();
        eprintln!("dead member listed for {listed:?} with a 2 s grace");
        assert!(listed >= Duration::from_millis(1500));
    }
}
