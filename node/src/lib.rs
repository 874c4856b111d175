//! The Herald node: a pub/sub broker that speaks the client contract over
//! WebSocket and HTTP.
//!
//! Layers, from the client inwards:
//! - [`client`]: the client port (WebSocket upgrade, HTTP publish);
//! - [`session`]: one WebSocket session, writing through its [`outbox`];
//! - [`router`]: the handle sessions use to reach the shards;
//! - [`shard`]: tasks that own topics, combining the [`owner`] role
//!   (sequencing, [`history`], interest) with local [`delivery`];
//! - [`admin`], [`metrics`], [`telemetry`]: what operators see;
//! - [`config`], [`lifecycle`], [`admission`], [`auth`], [`system`].

pub mod admin;
pub mod admission;
pub mod auth;
pub mod cert;
pub mod client;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod doctor;
pub mod healthcheck;
pub mod history;
pub mod lifecycle;
pub mod load;
pub mod membership;
pub mod metrics;
pub mod outbox;
pub mod owner;
pub mod ring;
pub mod router;
pub mod session;
pub mod shard;
pub mod system;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::AdminContext;
use crate::admission::Admission;
use crate::auth::{Auth, AuthError};
use crate::client::ClientContext;
use crate::cluster::ClusterSetup;
use crate::config::Config;
use crate::lifecycle::{Lifecycle, Phase};
use crate::membership::{MemberState, Membership};
use crate::owner::{NodeId, OwnerLimits};
use crate::router::{Router, RouterSetup};
use crate::tls::TlsMaterial;
use crate::transport::quic::QuicTransport;
use crate::transport::SharedTransport;
use protocol::peer::{Hello, PEER_PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch};

/// How long closing sessions get to say goodbye before the process exits.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cluster TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("node.id is {node} but the certificate in cluster.cert is for {cert}: each node needs its own certificate")]
    CertificateMismatch { node: String, cert: String },
    #[error("cluster transport: {0}")]
    Transport(#[from] transport::quic::QuicError),
    #[error("membership: {0}")]
    Membership(#[from] membership::MembershipError),
}

/// Accept queue asked of the kernel (which caps it at `net.core.somaxconn`):
/// tokio's default of 128 overflows when thousands of clients reconnect at
/// once after a node restart.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    let error = |source| NodeError::Bind { what, addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(error)?;
    // A restarted node must rebind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    socket.listen(LISTEN_BACKLOG).map_err(error)
}

/// Runs the node until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> Result<(), NodeError> {
    let node_id: NodeId = Arc::from(config.node.id.as_str());
    // The generation tells a restarted node from its previous life.
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    system::raise_fd_limit(config.client.max_connections);
    let signal = lifecycle::shutdown_signal().map_err(NodeError::Signals)?;

    let auth = Auth::from_config(&config.auth)?;
    if auth.is_none() {
        warn!("auth is off: any client may publish and subscribe to any topic (set auth.hs256_secret or auth.rs256_public_key)");
    }
    let shards = config.shards();
    let client_listener = bind("client", config.client.listen).await?;
    let admin_listener = bind("admin", config.admin.listen).await?;
    let client_addr = client_listener.local_addr().unwrap_or(config.client.listen);
    let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.listen);

    let peers = if config.clustered() {
        Some(start_transport(&config, &node_id, generation)?)
    } else {
        None
    };
    let router = Router::start(RouterSetup {
        node: node_id.clone(),
        shards,
        limits: OwnerLimits {
            history_messages: config.history.max_messages,
            history_age: config.history.max_age,
            // Each shard owns its topics' histories: the node's budget is
            // split evenly between them. 0 is no bound.
            history_bytes: (config.history.max_bytes > 0)
                .then(|| config.history.max_bytes / shards.max(1)),
        },
        transport: peers
            .as_ref()
            .map(|p| p.transport.clone() as SharedTransport),
        request_timeout: config.cluster.request_timeout,
    });
    let lifecycle = Lifecycle::new();
    let admission = Admission::new(
        config.client.max_connections,
        config.client.admission_threshold,
        config.client.admission_rate,
        config.soft_limit(),
    );

    let (cluster, membership) = match peers {
        Some(peers) => {
            let host = membership::advertised_host(&config);
            let advert = membership::SelfAdvert {
                node: node_id.clone(),
                generation,
                client_addr: format!("{host}:{}", client_addr.port()),
                admin_addr: format!("{host}:{}", admin_addr.port()),
                cluster_addr: format!("{host}:{}", peers.transport.local_addr().port()),
            };
            let members = Membership::start(&config, advert).await?;
            let (view, state) = cluster::start(ClusterSetup {
                node: node_id.clone(),
                vnodes: config.cluster.vnodes,
                has_seeds: !config.cluster.seeds.is_empty(),
                join_timeout: config.cluster.join_timeout,
                router: router.clone(),
                transport: peers.transport.clone(),
                inbound: peers.inbound,
                members: members.watch(),
                lifecycle: lifecycle.clone(),
            });
            let gossip = tokio::spawn(gossip_self(
                members,
                state,
                admission.clone(),
                peers.transport.clone(),
                lifecycle.watch(),
            ));
            (Some(view), Some((gossip, peers.transport)))
        }
        None => (None, None),
    };
    let cluster_addr = match &membership {
        Some((_, transport)) => transport.local_addr().to_string(),
        None => config.cluster.listen.to_string(),
    };

    let admin = Arc::new(AdminContext {
        node_id: node_id.clone(),
        generation,
        client_addr: client_addr.to_string(),
        admin_addr: admin_addr.to_string(),
        cluster_addr,
        vnodes: config.cluster.vnodes,
        lifecycle: lifecycle.clone(),
        admission: admission.clone(),
        router: router.clone(),
        cluster,
        lag: load::SchedulingLag::start(),
        max_lag: config.admin.max_scheduling_lag,
        memory: load::MemoryLimit::detect(config.admin.memory_limit),
        max_memory_fraction: config.admin.max_memory_fraction,
    });
    tokio::spawn(admin::serve(admin_listener, admin));

    let router_for_watchdog = router.clone();
    let clients = Arc::new(ClientContext {
        limits: config.client.clone(),
        router,
        admission: admission.clone(),
        auth,
        lifecycle: lifecycle.clone(),
        panic_topic: config.testing.panic_topic.clone(),
        stall_topic: config.testing.stall_topic.clone(),
        node_id: node_id.clone(),
    });
    tokio::spawn(client::serve(client_listener, clients));
    info!(
        node_id = %node_id,
        client = %client_addr,
        admin = %admin_addr,
        shards,
        "herald is ready"
    );
    systemd::notify("READY=1");
    if let Some(interval) = systemd::watchdog_interval() {
        // Pet the watchdog only while the shards answer: a wedged node is
        // restarted by systemd instead of lingering.
        let router = router_for_watchdog;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                if router.healthy(interval / 2).await {
                    systemd::notify("WATCHDOG=1");
                }
            }
        });
    }

    let signal = signal.await;
    drain(&lifecycle, &admission, config.node.drain_grace, signal).await;
    if let Some((gossip, transport)) = membership {
        // The gossip task saw Closing: it says goodbye and stops; then the
        // peers' connections close.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, gossip).await;
        transport.shutdown().await;
    }
    Ok(())
}

/// The QUIC side of a clustered node, before the router exists.
struct Peers {
    transport: Arc<QuicTransport>,
    inbound: mpsc::Receiver<transport::Inbound>,
}

fn start_transport(config: &Config, node: &NodeId, generation: u64) -> Result<Peers, NodeError> {
    let material = TlsMaterial::from_config(&config.cluster)?;
    if material.node_id() != &**node {
        return Err(NodeError::CertificateMismatch {
            node: node.to_string(),
            cert: material.node_id().to_owned(),
        });
    }
    let configs = material.quic_configs(config.cluster.keep_alive, config.cluster.idle_timeout)?;
    let hello = Hello {
        version: PEER_PROTOCOL_VERSION,
        cluster: config.cluster.name.clone(),
        node_id: node.to_string(),
        generation,
    };
    // Frames from peers wait here for the coordinator: bounded, so a slow
    // node pushes back on its peers' streams instead of growing.
    let (inbound_tx, inbound) = mpsc::channel(8192);
    let transport = QuicTransport::start(
        config.cluster.listen,
        &configs,
        hello,
        inbound_tx,
        config.cluster.peer_queue_frames,
    )?;
    transport.register_metrics();
    Ok(Peers {
        transport: Arc::new(transport),
        inbound,
    })
}

/// Keeps what this node gossips about itself current: its state (from the
/// coordinator), its load, and whether its links are backed up; leaves the
/// cluster when the node closes.
async fn gossip_self(
    membership: Membership,
    mut state: watch::Receiver<MemberState>,
    admission: Arc<Admission>,
    transport: transport::SharedTransport,
    mut phase: watch::Receiver<Phase>,
) {
    let mut load = tokio::time::interval(Duration::from_secs(1));
    let mut gossiped_congested = false;
    loop {
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Closing {
                    break;
                }
            }
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *state.borrow_and_update();
                membership.set_state(now).await;
            }
            _ = load.tick() => {
                membership.set_connections(admission.active() as u64).await;
            }
            // Goes out with the next gossip round.
            _ = transport.backlog().links_changed() => {
                let congested = transport.backlog().links_congested();
                if congested != gossiped_congested {
                    membership.set_congested(congested).await;
                    gossiped_congested = congested;
                }
            }
        }
    }
    membership.set_state(MemberState::Dead).await;
    membership.shutdown().await;
}

/// Stops taking clients, gives open sessions the grace period, then closes
/// them with 1001 and waits (bounded) for them to finish.
async fn drain(lifecycle: &Lifecycle, admission: &Admission, grace: Duration, signal: &str) {
    info!(signal, grace = ?grace, sessions = admission.active(), "draining");
    systemd::notify("STOPPING=1");
    lifecycle.set(Phase::Draining);
    let deadline = Instant::now() + grace;
    while admission.active() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lifecycle.set(Phase::Closing);
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    while admission.active() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!(remaining = admission.active(), "stopped");
}
