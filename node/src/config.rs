//! Node configuration: a TOML file, then the environment, then flags, each
//! overriding the one before (flag > environment > file > default).
//!
//! Names follow one rule: TOML `section.key` = `HERALD_SECTION_KEY` =
//! `--section-key`, with the contract's exceptions (`--node-id`,
//! `--advertise`, `--seed`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

/// Longest `client.write_delay`: beyond it batching saves nothing more and
/// only adds latency.
const MAX_WRITE_DELAY: Duration = Duration::from_secs(1);

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: a clustered real-time pub/sub broker.",
    long_about = "Herald: a clustered real-time pub/sub broker.\n\n\
        With no arguments, runs a single-node broker on 127.0.0.1 \
        (clients on :7400, admin on :7480).\n\
        Every setting comes from the TOML file, the environment or a flag; \
        a flag beats the environment, which beats the file."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker (the default).
    Run,
    /// Make certificates for the cluster's mutual TLS (development, compose).
    #[command(subcommand)]
    Cert(CertCommand),
    /// Check this host against the production checklist for this
    /// configuration: one line per item (pass, warn, fail, with the fix);
    /// exits non-zero on any fail.
    Doctor,
    /// Exit 0 when a node's admin endpoint answers 200 (for container
    /// HEALTHCHECKs, where there is no curl).
    Healthcheck {
        /// The URL to GET (plain http). Default: `/healthz` on the admin
        /// address from HERALD_ADMIN_LISTEN (a wildcard host becomes
        /// loopback), else http://127.0.0.1:7480/healthz.
        #[arg(long)]
        url: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Write a new cluster CA: DIR/ca.pem and DIR/ca-key.pem.
    Ca {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a node certificate signed by the CA in --ca: DIR/ID.pem and DIR/ID-key.pem.
    Node {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        /// The node id the certificate is for.
        #[arg(long)]
        name: String,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS names or IP addresses for the certificate (repeatable).
        #[arg(long = "san")]
        extra_names: Vec<String>,
    },
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Every setting as a flag with its environment variable. `None` means "not
/// given here": the file or the default decides.
#[derive(Debug, Default, Args)]
pub struct Settings {
    /// TOML configuration file.
    #[arg(long, env = "HERALD_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// Node id (default: the host name).
    #[arg(long = "node-id", env = "HERALD_NODE_ID")]
    pub node_id: Option<String>,
    /// Grace period after SIGTERM before open sessions are closed with 1001.
    #[arg(long = "node-drain-grace", env = "HERALD_NODE_DRAIN_GRACE", value_parser = duration)]
    pub node_drain_grace: Option<Duration>,
    /// Topic shards (default: one per worker thread).
    #[arg(long = "node-shards", env = "HERALD_NODE_SHARDS")]
    pub node_shards: Option<usize>,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long = "node-worker-threads", env = "HERALD_NODE_WORKER_THREADS")]
    pub node_worker_threads: Option<usize>,

    /// Client listener: WebSocket at /ws and the HTTP publish API.
    #[arg(long = "client-listen", env = "HERALD_CLIENT_LISTEN")]
    pub client_listen: Option<SocketAddr>,
    /// Hard cap on client connections; over it new sessions close with 1013.
    #[arg(long = "client-max-connections", env = "HERALD_CLIENT_MAX_CONNECTIONS")]
    pub client_max_connections: Option<usize>,
    /// Above this many connections, new ones are admitted at a limited rate.
    #[arg(
        long = "client-admission-threshold",
        env = "HERALD_CLIENT_ADMISSION_THRESHOLD"
    )]
    pub client_admission_threshold: Option<usize>,
    /// /readyz reports overloaded at this many connections (default: 90% of
    /// client.max_connections), so a load balancer sends new clients
    /// elsewhere before the hard cap refuses them.
    #[arg(long = "client-soft-limit", env = "HERALD_CLIENT_SOFT_LIMIT")]
    pub client_soft_limit: Option<usize>,
    /// New connections per second admitted above the threshold.
    #[arg(long = "client-admission-rate", env = "HERALD_CLIENT_ADMISSION_RATE")]
    pub client_admission_rate: Option<u32>,
    /// Time allowed for an HTTP request's headers (WebSocket handshake included).
    #[arg(long = "client-handshake-timeout", env = "HERALD_CLIENT_HANDSHAKE_TIMEOUT", value_parser = duration)]
    pub client_handshake_timeout: Option<Duration>,
    /// Interval of server WebSocket pings.
    #[arg(long = "client-ping-interval", env = "HERALD_CLIENT_PING_INTERVAL", value_parser = duration)]
    pub client_ping_interval: Option<Duration>,
    /// A session with no frame or pong for this long is closed with 4002.
    #[arg(long = "client-idle-timeout", env = "HERALD_CLIENT_IDLE_TIMEOUT", value_parser = duration)]
    pub client_idle_timeout: Option<Duration>,
    /// Largest message (WebSocket message or HTTP body), in bytes.
    #[arg(
        long = "client-max-message-bytes",
        env = "HERALD_CLIENT_MAX_MESSAGE_BYTES"
    )]
    pub client_max_message_bytes: Option<usize>,
    /// Subscriptions per session.
    #[arg(
        long = "client-max-subscriptions",
        env = "HERALD_CLIENT_MAX_SUBSCRIPTIONS"
    )]
    pub client_max_subscriptions: Option<usize>,
    /// Messages queued to one session before it is a slow consumer (4001).
    #[arg(long = "client-outbound-queue", env = "HERALD_CLIENT_OUTBOUND_QUEUE")]
    pub client_outbound_queue: Option<usize>,
    /// Bytes queued to one session before it is a slow consumer (4001).
    #[arg(
        long = "client-outbound-queue-bytes",
        env = "HERALD_CLIENT_OUTBOUND_QUEUE_BYTES"
    )]
    pub client_outbound_queue_bytes: Option<usize>,
    /// How long a session may hold messages back to send them together
    /// (0: send at once). Replies are never held back.
    #[arg(long = "client-write-delay", env = "HERALD_CLIENT_WRITE_DELAY", value_parser = duration)]
    pub client_write_delay: Option<Duration>,

    /// Admin listener: /metrics, /healthz, /readyz, /v1/cluster.
    #[arg(long = "admin-listen", env = "HERALD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// /readyz reports scheduling_lag when the runtime's timers run this late.
    #[arg(long = "admin-max-scheduling-lag", env = "HERALD_ADMIN_MAX_SCHEDULING_LAG", value_parser = duration)]
    pub admin_max_scheduling_lag: Option<Duration>,
    /// /readyz reports memory above this fraction of the memory limit.
    #[arg(
        long = "admin-max-memory-fraction",
        env = "HERALD_ADMIN_MAX_MEMORY_FRACTION"
    )]
    pub admin_max_memory_fraction: Option<f64>,
    /// Memory budget in bytes where no cgroup limit applies (overrides it when set).
    #[arg(long = "admin-memory-limit", env = "HERALD_ADMIN_MEMORY_LIMIT")]
    pub admin_memory_limit: Option<u64>,

    /// QUIC listener for other nodes.
    #[arg(long = "cluster-listen", env = "HERALD_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// Host other nodes reach this one at.
    #[arg(long = "advertise", env = "HERALD_CLUSTER_ADVERTISE")]
    pub cluster_advertise: Option<String>,
    /// Gossip address (host:port) of a member to join; repeatable.
    #[arg(long = "seed", env = "HERALD_CLUSTER_SEEDS", value_delimiter = ',')]
    pub cluster_seeds: Option<Vec<String>>,
    /// Cluster name; nodes with another name never join.
    #[arg(long = "cluster-name", env = "HERALD_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Cluster CA certificate (PEM).
    #[arg(long = "cluster-ca", env = "HERALD_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by the cluster CA.
    #[arg(long = "cluster-cert", env = "HERALD_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long = "cluster-key", env = "HERALD_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,

    /// Virtual nodes per member on the placement ring.
    #[arg(long = "cluster-vnodes", env = "HERALD_CLUSTER_VNODES")]
    pub cluster_vnodes: Option<usize>,
    /// With seeds: how long to look for a live member before serving alone.
    #[arg(long = "cluster-join-timeout", env = "HERALD_CLUSTER_JOIN_TIMEOUT", value_parser = duration)]
    pub cluster_join_timeout: Option<Duration>,
    /// A request to another node (publish ack, subscribe) fails with
    /// `unavailable` after this long.
    #[arg(long = "cluster-request-timeout", env = "HERALD_CLUSTER_REQUEST_TIMEOUT", value_parser = duration)]
    pub cluster_request_timeout: Option<Duration>,
    /// Frames queued for one peer; client publishes wait while a quarter
    /// of it is used, and frames beyond it are dropped.
    #[arg(
        long = "cluster-peer-queue-frames",
        env = "HERALD_CLUSTER_PEER_QUEUE_FRAMES"
    )]
    pub cluster_peer_queue_frames: Option<usize>,
    /// QUIC keep-alive between nodes.
    #[arg(long = "cluster-keep-alive", env = "HERALD_CLUSTER_KEEP_ALIVE", value_parser = duration)]
    pub cluster_keep_alive: Option<Duration>,
    /// A QUIC connection silent this long is dead.
    #[arg(long = "cluster-idle-timeout", env = "HERALD_CLUSTER_IDLE_TIMEOUT", value_parser = duration)]
    pub cluster_idle_timeout: Option<Duration>,

    /// Gossip (membership) listener, UDP.
    #[arg(long = "gossip-listen", env = "HERALD_GOSSIP_LISTEN")]
    pub gossip_listen: Option<SocketAddr>,
    /// Interval between gossip rounds.
    #[arg(long = "gossip-interval", env = "HERALD_GOSSIP_INTERVAL", value_parser = duration)]
    pub gossip_interval: Option<Duration>,
    /// Phi-accrual threshold above which a member is considered dead.
    #[arg(long = "gossip-phi-threshold", env = "HERALD_GOSSIP_PHI_THRESHOLD")]
    pub gossip_phi_threshold: Option<f64>,
    /// How long a dead member stays listed (as dead) before it is forgotten.
    #[arg(long = "gossip-dead-grace", env = "HERALD_GOSSIP_DEAD_GRACE", value_parser = duration)]
    pub gossip_dead_grace: Option<Duration>,

    /// Messages kept per topic for recovery.
    #[arg(long = "history-max-messages", env = "HERALD_HISTORY_MAX_MESSAGES")]
    pub history_max_messages: Option<usize>,
    /// Age after which a topic's messages leave its history.
    #[arg(long = "history-max-age", env = "HERALD_HISTORY_MAX_AGE", value_parser = duration)]
    pub history_max_age: Option<Duration>,
    /// Bytes all topic histories of the node may hold together; past it the
    /// oldest messages go first. 0 (the default) is no bound.
    #[arg(long = "history-max-bytes", env = "HERALD_HISTORY_MAX_BYTES")]
    pub history_max_bytes: Option<usize>,

    /// Enables JWT auth with this HS256 secret.
    #[arg(
        long = "auth-hs256-secret",
        env = "HERALD_AUTH_HS256_SECRET",
        hide_env_values = true
    )]
    pub auth_hs256_secret: Option<String>,
    /// Enables JWT auth with this RS256 public key (PEM file).
    #[arg(long = "auth-rs256-public-key", env = "HERALD_AUTH_RS256_PUBLIC_KEY")]
    pub auth_rs256_public_key: Option<PathBuf>,

    /// Log format: text or json.
    #[arg(long = "log-format", env = "HERALD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Fault injection for tests: a pub to this topic panics its session.
    #[arg(
        long = "testing-panic-topic",
        env = "HERALD_TESTING_PANIC_TOPIC",
        hide = true
    )]
    pub testing_panic_topic: Option<String>,
    /// Fault injection for tests: a pub to this topic blocks a runtime
    /// worker for a second (a stall, as a CPU-bound bug would cause).
    #[arg(
        long = "testing-stall-topic",
        env = "HERALD_TESTING_STALL_TOPIC",
        hide = true
    )]
    pub testing_stall_topic: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The effective configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub client: ClientConfig,
    pub admin: AdminConfig,
    pub cluster: ClusterConfig,
    pub gossip: GossipConfig,
    pub history: HistoryConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub testing: TestingConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub id: String,
    #[serde(with = "duration_text")]
    pub drain_grace: Duration,
    pub shards: Option<usize>,
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub admission_threshold: usize,
    /// `None`: 90% of `max_connections`.
    pub soft_limit: Option<usize>,
    pub admission_rate: u32,
    #[serde(with = "duration_text")]
    pub handshake_timeout: Duration,
    #[serde(with = "duration_text")]
    pub ping_interval: Duration,
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    /// Messages queued within this long of a session's last write wait
    /// until then and go out together (replies, a close or a half-full
    /// queue go at once); zero writes each at once.
    #[serde(with = "duration_text")]
    pub write_delay: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `/readyz` reports `scheduling_lag` when timers run this late.
    #[serde(with = "duration_text")]
    pub max_scheduling_lag: Duration,
    /// `/readyz` reports `memory` above this fraction of the memory limit.
    pub max_memory_fraction: f64,
    /// A memory budget in bytes, for hosts without a cgroup limit; with
    /// one, the cgroup's limit is used unless this is set.
    pub memory_limit: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub seeds: Vec<String>,
    pub name: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Virtual nodes per member on the placement ring.
    pub vnodes: usize,
    #[serde(with = "duration_text")]
    pub join_timeout: Duration,
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    /// Frames queued for one peer (see [`crate::transport::Backlog`]).
    pub peer_queue_frames: usize,
    #[serde(with = "duration_text")]
    pub keep_alive: Duration,
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipConfig {
    pub listen: SocketAddr,
    #[serde(with = "duration_text")]
    pub interval: Duration,
    pub phi_threshold: f64,
    #[serde(with = "duration_text")]
    pub dead_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    pub max_messages: usize,
    #[serde(with = "duration_text")]
    pub max_age: Duration,
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub hs256_secret: Option<String>,
    pub rs256_public_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TestingConfig {
    pub panic_topic: Option<String>,
    pub stall_topic: Option<String>,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: host_name(),
            drain_grace: Duration::from_secs(10),
            shards: None,
            worker_threads: None,
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            listen: loopback(7400),
            max_connections: 50_000,
            admission_threshold: 5_000,
            soft_limit: None,
            admission_rate: 50,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            max_message_bytes: protocol::limits::DEFAULT_MAX_MESSAGE_BYTES,
            max_subscriptions: protocol::limits::DEFAULT_MAX_SUBSCRIPTIONS,
            outbound_queue: 8192,
            outbound_queue_bytes: 16 * 1024 * 1024,
            write_delay: Duration::ZERO,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: loopback(7480),
            max_scheduling_lag: Duration::from_millis(250),
            max_memory_fraction: 0.9,
            memory_limit: None,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: loopback(7401),
            advertise: None,
            seeds: Vec::new(),
            name: "herald".to_owned(),
            ca: None,
            cert: None,
            key: None,
            vnodes: 160,
            join_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            peer_queue_frames: crate::transport::quic::SEND_QUEUE_FRAMES,
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            listen: loopback(7402),
            interval: Duration::from_millis(250),
            phi_threshold: 8.0,
            dead_grace: Duration::from_secs(60),
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_messages: 1000,
            max_age: Duration::from_secs(300),
            // No bound by default: the contract promises every topic at
            // least `max_messages` and `max_age`. Production configs set one.
            max_bytes: 0,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
        }
    }
}

/// The machine's host name, the default node id.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "herald".to_owned()
    } else {
        name
    }
}

impl Config {
    /// Builds the effective configuration from the file named by the
    /// settings (if any), overridden by the settings themselves (flags and
    /// environment, which clap has already merged).
    pub fn load(settings: &Settings) -> Result<Config, ConfigError> {
        let mut config = match &settings.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        config.apply(settings);
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    fn apply(&mut self, s: &Settings) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        fn set_some<T: Clone>(target: &mut Option<T>, value: &Option<T>) {
            if value.is_some() {
                target.clone_from(value);
            }
        }
        set(&mut self.node.id, &s.node_id);
        set(&mut self.node.drain_grace, &s.node_drain_grace);
        set_some(&mut self.node.shards, &s.node_shards);
        set_some(&mut self.node.worker_threads, &s.node_worker_threads);
        set(&mut self.client.listen, &s.client_listen);
        set(&mut self.client.max_connections, &s.client_max_connections);
        set(
            &mut self.client.admission_threshold,
            &s.client_admission_threshold,
        );
        set_some(&mut self.client.soft_limit, &s.client_soft_limit);
        set(&mut self.client.admission_rate, &s.client_admission_rate);
        set(
            &mut self.client.handshake_timeout,
            &s.client_handshake_timeout,
        );
        set(&mut self.client.ping_interval, &s.client_ping_interval);
        set(&mut self.client.idle_timeout, &s.client_idle_timeout);
        set(
            &mut self.client.max_message_bytes,
            &s.client_max_message_bytes,
        );
        set(
            &mut self.client.max_subscriptions,
            &s.client_max_subscriptions,
        );
        set(&mut self.client.outbound_queue, &s.client_outbound_queue);
        set(
            &mut self.client.outbound_queue_bytes,
            &s.client_outbound_queue_bytes,
        );
        set(&mut self.client.write_delay, &s.client_write_delay);
        set(&mut self.admin.listen, &s.admin_listen);
        set(
            &mut self.admin.max_scheduling_lag,
            &s.admin_max_scheduling_lag,
        );
        set(
            &mut self.admin.max_memory_fraction,
            &s.admin_max_memory_fraction,
        );
        set_some(&mut self.admin.memory_limit, &s.admin_memory_limit);
        set(&mut self.cluster.listen, &s.cluster_listen);
        set_some(&mut self.cluster.advertise, &s.cluster_advertise);
        set(&mut self.cluster.seeds, &s.cluster_seeds);
        set(&mut self.cluster.name, &s.cluster_name);
        set_some(&mut self.cluster.ca, &s.cluster_ca);
        set_some(&mut self.cluster.cert, &s.cluster_cert);
        set_some(&mut self.cluster.key, &s.cluster_key);
        set(&mut self.cluster.vnodes, &s.cluster_vnodes);
        set(&mut self.cluster.join_timeout, &s.cluster_join_timeout);
        set(
            &mut self.cluster.request_timeout,
            &s.cluster_request_timeout,
        );
        set(
            &mut self.cluster.peer_queue_frames,
            &s.cluster_peer_queue_frames,
        );
        set(&mut self.cluster.keep_alive, &s.cluster_keep_alive);
        set(&mut self.cluster.idle_timeout, &s.cluster_idle_timeout);
        set(&mut self.gossip.listen, &s.gossip_listen);
        set(&mut self.gossip.interval, &s.gossip_interval);
        set(&mut self.gossip.phi_threshold, &s.gossip_phi_threshold);
        set(&mut self.gossip.dead_grace, &s.gossip_dead_grace);
        set(&mut self.history.max_messages, &s.history_max_messages);
        set(&mut self.history.max_age, &s.history_max_age);
        set(&mut self.history.max_bytes, &s.history_max_bytes);
        set_some(&mut self.auth.hs256_secret, &s.auth_hs256_secret);
        set_some(&mut self.auth.rs256_public_key, &s.auth_rs256_public_key);
        set(&mut self.log.format, &s.log_format);
        set_some(&mut self.testing.panic_topic, &s.testing_panic_topic);
        set_some(&mut self.testing.stall_topic, &s.testing_stall_topic);
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if self.node.id.is_empty() {
            return invalid("node.id", "must not be empty");
        }
        if self.node.shards == Some(0) {
            return invalid("node.shards", "must be at least 1");
        }
        if self.node.worker_threads == Some(0) {
            return invalid("node.worker_threads", "must be at least 1");
        }
        if self.client.max_message_bytes == 0 {
            return invalid("client.max_message_bytes", "must be at least 1");
        }
        if self.client.outbound_queue == 0 {
            return invalid("client.outbound_queue", "must be at least 1");
        }
        if self.client.ping_interval.is_zero() || self.client.idle_timeout.is_zero() {
            return invalid("client.ping_interval", "intervals must be above zero");
        }
        if self.client.write_delay > MAX_WRITE_DELAY {
            return invalid("client.write_delay", "must be at most 1s");
        }
        if self.cluster.peer_queue_frames < 16 {
            return invalid("cluster.peer_queue_frames", "must be at least 16");
        }
        if self.history.max_messages == 0 {
            return invalid("history.max_messages", "must be at least 1");
        }
        if self.history.max_bytes != 0 && self.history.max_bytes < self.client.max_message_bytes {
            return invalid(
                "history.max_bytes",
                "must be 0 (no bound) or at least client.max_message_bytes (one message)",
            );
        }
        if self.auth.hs256_secret.is_some() && self.auth.rs256_public_key.is_some() {
            return invalid("auth", "set hs256_secret or rs256_public_key, not both");
        }
        let tls = [&self.cluster.ca, &self.cluster.cert, &self.cluster.key];
        let tls_given = tls.iter().filter(|p| p.is_some()).count();
        if !self.cluster.seeds.is_empty() && tls_given < 3 {
            return invalid(
                "cluster.seeds",
                "nodes authenticate each other with mutual TLS: with seeds, also set \
                 cluster.ca, cluster.cert and cluster.key (`herald cert --help` makes them)",
            );
        }
        if tls_given != 0 && tls_given != 3 {
            return invalid(
                "cluster.ca",
                "set cluster.ca, cluster.cert and cluster.key together",
            );
        }
        let fraction = self.admin.max_memory_fraction;
        if fraction.is_nan() || fraction <= 0.0 || fraction > 1.0 {
            return invalid("admin.max_memory_fraction", "must be in (0, 1]");
        }
        if self.cluster.vnodes == 0 {
            return invalid("cluster.vnodes", "must be at least 1");
        }
        if self.gossip.phi_threshold.is_nan() || self.gossip.phi_threshold <= 0.0 {
            return invalid("gossip.phi_threshold", "must be above zero");
        }
        if self.cluster.keep_alive >= self.cluster.idle_timeout {
            return invalid(
                "cluster.keep_alive",
                "must be shorter than cluster.idle_timeout",
            );
        }
        Ok(())
    }

    /// Connections at which `/readyz` says overloaded.
    pub fn soft_limit(&self) -> usize {
        self.client
            .soft_limit
            .unwrap_or((self.client.max_connections * 9).div_ceil(10))
            .min(self.client.max_connections)
    }

    /// True when this node takes part in a cluster: TLS material is set
    /// (with or without seeds: a node without seeds is a cluster's first).
    pub fn clustered(&self) -> bool {
        self.cluster.cert.is_some()
    }

    /// Topic shards: the configured number, or one per worker thread.
    pub fn shards(&self) -> usize {
        self.node
            .shards
            .or(self.node.worker_threads)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// Durations in the file are humantime strings such as "500ms" or "5m".
mod duration_text {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(c.client.listen, loopback(7400));
        assert_eq!(c.admin.listen, loopback(7480));
        assert_eq!(c.cluster.listen, loopback(7401));
        assert_eq!(c.gossip.listen, loopback(7402));
        assert_eq!(c.cluster.name, "herald");
        assert!(!c.node.id.is_empty());
    }

    #[test]
    fn file_is_overridden_by_settings() {
        let file: Config = toml::from_str(
            "[client]\nlisten = \"127.0.0.1:9000\"\nidle_timeout = \"5s\"\nwrite_delay = \"20ms\"\n[node]\nid = \"a\"\n",
        )
        .expect("valid toml");
        assert_eq!(file.client.idle_timeout, Duration::from_secs(5));
        assert_eq!(file.client.write_delay, Duration::from_millis(20));
        let mut config = file;
        config.apply(&Settings {
            node_id: Some("b".into()),
            ..Settings::default()
        });
        assert_eq!(config.node.id, "b");
        assert_eq!(config.client.listen, loopback(9000));
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("[client]\nlisen = \"x\"\n").is_err());
    }
}
