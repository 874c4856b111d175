//! Process-wide counters and gauges, rendered in the Prometheus text format.
//!
//! Plain atomics in one static: the hot path pays one relaxed add per event,
//! and no label set can grow with traffic (close codes and reasons are fixed
//! lists).

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use protocol::Codec;

use crate::owner::NodeId;

pub static METRICS: Metrics = Metrics::new();

/// A counter that only rises.
#[derive(Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Latency buckets (seconds) of the publish-to-deliver histogram: sub-ms
/// on one node, a few ms across a LAN, and the tail.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A Prometheus histogram over [`LATENCY_BUCKETS`], lock-free.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe_micros(&self, micros: u64) {
        let seconds = micros as f64 / 1e6;
        if let Some(at) = LATENCY_BUCKETS.iter().position(|le| seconds <= *le) {
            self.buckets[at].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        let mut cumulative = 0;
        for (le, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Microseconds since the Unix epoch, the clock messages are stamped with.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A value that rises and falls.
#[derive(Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    const fn new() -> Self {
        Gauge(AtomicI64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.add(-1);
    }
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }
}

/// WebSocket close codes the node sends, as metric labels.
pub const CLOSE_CODES: [u16; 8] = [1000, 1001, 1002, 1008, 1009, 1011, 1013, 4001];
/// Close codes beyond the first list.
pub const MORE_CLOSE_CODES: [u16; 2] = [4002, 0];

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy)]
pub enum Rejection {
    ConnectionLimit,
    AdmissionRate,
    Draining,
}

#[derive(Debug)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_by_codec: [Gauge; 2],
    pub connects: Counter,
    /// Indexed like `CLOSE_CODES` followed by `MORE_CLOSE_CODES`; code 0
    /// stands for "the connection ended without a close frame".
    disconnects: [Counter; 10],
    rejections: [Counter; 3],
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// Flushes of a session's queue to its socket.
    pub client_writes: Counter,
    pub slow_consumers: Counter,
    pub subscriptions: Gauge,
    pub topics: Gauge,
    pub history_messages: Gauge,
    pub history_bytes: Gauge,
    pub history_evicted: Counter,
    pub session_panics: Counter,
    pub http_publishes: Counter,
    pub owner_unavailable: Counter,
    pub peer_frames_dropped: Counter,
    pub publish_backlog_waits: Counter,
    pub publish_backlog_timeouts: Counter,
    pub ring_changes: Counter,
    pub members_ready: Gauge,
    pub members_joining: Gauge,
    pub members_draining: Gauge,
    pub members_dead: Gauge,
    /// Other members gossiping backed-up links (client publishes wait).
    pub members_congested: Gauge,
    pub scheduling_lag_micros: Gauge,
    pub delivery_latency: Histogram,
    /// Entries of the shards' tables, by [`Table`]; each shard refreshes
    /// its part every second.
    pub table_entries: [Gauge; 3],
}

/// The tables a shard keeps, as `herald_table_entries{table}` shows them.
/// Each should follow the node's subscriptions and traffic; one that grows
/// while they do not is a leak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// (node, subscription key) pairs the topic owners hold: which nodes
    /// have subscribers for each topic, pattern and group.
    Interest = 0,
    /// (session, subscription key) pairs of this node's sessions.
    Local = 1,
    /// Requests waiting on another node's answer.
    Pending = 2,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Interest, Table::Local, Table::Pending];

    fn label(self) -> &'static str {
        match self {
            Table::Interest => "interest",
            Table::Local => "local",
            Table::Pending => "pending",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub const fn new() -> Self {
        Metrics {
            connections: Gauge::new(),
            connections_by_codec: [Gauge::new(), Gauge::new()],
            connects: Counter::new(),
            disconnects: [const { Counter::new() }; 10],
            rejections: [const { Counter::new() }; 3],
            messages_in: Counter::new(),
            messages_out: Counter::new(),
            bytes_in: Counter::new(),
            bytes_out: Counter::new(),
            client_writes: Counter::new(),
            slow_consumers: Counter::new(),
            subscriptions: Gauge::new(),
            topics: Gauge::new(),
            history_messages: Gauge::new(),
            history_bytes: Gauge::new(),
            history_evicted: Counter::new(),
            session_panics: Counter::new(),
            http_publishes: Counter::new(),
            owner_unavailable: Counter::new(),
            peer_frames_dropped: Counter::new(),
            publish_backlog_waits: Counter::new(),
            publish_backlog_timeouts: Counter::new(),
            ring_changes: Counter::new(),
            members_ready: Gauge::new(),
            members_joining: Gauge::new(),
            members_draining: Gauge::new(),
            members_dead: Gauge::new(),
            members_congested: Gauge::new(),
            scheduling_lag_micros: Gauge::new(),
            delivery_latency: Histogram::new(),
            table_entries: [const { Gauge::new() }; 3],
        }
    }

    pub fn codec_connections(&self, codec: Codec) -> &Gauge {
        &self.connections_by_codec[codec_index(codec)]
    }

    /// Counts a session's end by the close code it ended with (`None`: no
    /// close frame).
    pub fn disconnected(&self, code: Option<u16>) {
        let code = code.unwrap_or(0);
        let index = all_close_codes()
            .position(|c| c == code)
            // Unlisted codes (a client's own) count as "no close frame" would
            // be wrong; they count under 1000, a normal close.
            .unwrap_or(0);
        self.disconnects[index].inc();
    }

    pub fn rejected(&self, why: Rejection) {
        self.rejections[why as usize].inc();
    }

    pub fn rejections(&self, why: Rejection) -> u64 {
        self.rejections[why as usize].get()
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        gauge(
            &mut out,
            "herald_connections",
            "Open client sessions.",
            self.connections.get(),
        );
        family(
            &mut out,
            ("herald_connections_by_codec", "gauge"),
            "Open client sessions by codec.",
            "codec",
            Codec::ALL.map(|codec| (codec.name(), self.codec_connections(codec).get())),
        );
        counter(
            &mut out,
            "herald_connects_total",
            "Client sessions opened.",
            self.connects.get(),
        );
        family(
            &mut out,
            ("herald_disconnects_total", "counter"),
            "Client sessions ended, by close code (0: no close frame).",
            "code",
            all_close_codes().zip(self.disconnects.iter().map(Counter::get)),
        );
        family(
            &mut out,
            ("herald_admission_rejections_total", "counter"),
            "Connections refused, by reason.",
            "reason",
            [
                ("connection_limit", Rejection::ConnectionLimit),
                ("admission_rate", Rejection::AdmissionRate),
                ("draining", Rejection::Draining),
            ]
            .map(|(reason, why)| (reason, self.rejections(why))),
        );
        counter(
            &mut out,
            "herald_messages_in_total",
            "Messages published to this node.",
            self.messages_in.get(),
        );
        counter(
            &mut out,
            "herald_messages_out_total",
            "Messages delivered to client sessions.",
            self.messages_out.get(),
        );
        counter(
            &mut out,
            "herald_bytes_in_total",
            "Payload bytes published to this node.",
            self.bytes_in.get(),
        );
        counter(
            &mut out,
            "herald_bytes_out_total",
            "Bytes written to client sessions.",
            self.bytes_out.get(),
        );
        counter(
            &mut out,
            "herald_client_writes_total",
            "Writes of queued messages and replies to client sockets, one flush each; messages out per write shows how much batching happens.",
            self.client_writes.get(),
        );
        counter(
            &mut out,
            "herald_slow_consumers_total",
            "Sessions closed as slow consumers (4001).",
            self.slow_consumers.get(),
        );
        gauge(
            &mut out,
            "herald_subscriptions",
            "Subscriptions of this node's sessions.",
            self.subscriptions.get(),
        );
        gauge(
            &mut out,
            "herald_topics",
            "Topics this node owns.",
            self.topics.get(),
        );
        gauge(
            &mut out,
            "herald_history_messages",
            "Messages held in topic histories.",
            self.history_messages.get(),
        );
        gauge(
            &mut out,
            "herald_history_bytes",
            "What topic histories hold, as counted against history.max_bytes.",
            self.history_bytes.get(),
        );
        counter(
            &mut out,
            "herald_history_evicted_total",
            "Retained messages dropped, oldest first, to keep history.max_bytes.",
            self.history_evicted.get(),
        );
        counter(
            &mut out,
            "herald_session_panics_total",
            "Sessions ended by a panic in their handler.",
            self.session_panics.get(),
        );
        counter(
            &mut out,
            "herald_http_publishes_total",
            "Messages published over HTTP.",
            self.http_publishes.get(),
        );
        counter(
            &mut out,
            "herald_owner_unavailable_total",
            "Requests that failed because the topic's owner could not be reached.",
            self.owner_unavailable.get(),
        );
        counter(
            &mut out,
            "herald_peer_frames_dropped_total",
            "Frames to other nodes that could not be queued (no connection, or queue full).",
            self.peer_frames_dropped.get(),
        );
        counter(
            &mut out,
            "herald_publish_backlog_waits_total",
            "Client publishes held back because a link to another node was backed up.",
            self.publish_backlog_waits.get(),
        );
        counter(
            &mut out,
            "herald_publish_backlog_timeouts_total",
            "Held-back publishes let through because the link stayed backed up past cluster.request_timeout.",
            self.publish_backlog_timeouts.get(),
        );
        counter(
            &mut out,
            "herald_ring_changes_total",
            "Times the placement ring was recomputed with other members.",
            self.ring_changes.get(),
        );
        family(
            &mut out,
            ("herald_cluster_members", "gauge"),
            "Known cluster members by state.",
            "state",
            [
                ("joining", &self.members_joining),
                ("ready", &self.members_ready),
                ("draining", &self.members_draining),
                ("dead", &self.members_dead),
            ]
            .map(|(state, gauge)| (state, gauge.get())),
        );
        gauge(
            &mut out,
            "herald_cluster_members_congested",
            "Other members whose links to their peers are backed up; while any is, client publishes here wait.",
            self.members_congested.get(),
        );
        self.delivery_latency.render(
            &mut out,
            "herald_publish_to_deliver_seconds",
            "From the owner sequencing a message to this node queueing it for its sessions (across nodes, includes clock skew).",
        );
        let _ = writeln!(
            out,
            "# HELP herald_scheduling_lag_seconds How late the runtime ran a timer, worst of the last second.\n\
             # TYPE herald_scheduling_lag_seconds gauge\n\
             herald_scheduling_lag_seconds {}",
            self.scheduling_lag_micros.get() as f64 / 1e6
        );
        family(
            &mut out,
            ("herald_table_entries", "gauge"),
            "Entries of the routing tables, refreshed every second: interest (nodes with subscribers, held by this node's topic owners), local (this node's sessions per subscription), pending (requests waiting on another node).",
            "table",
            Table::ALL.map(|table| (table.label(), self.table_entries[table as usize].get())),
        );
        out
    }
}

fn codec_index(codec: Codec) -> usize {
    match codec {
        Codec::Json => 0,
        Codec::Msgpack => 1,
    }
}

fn all_close_codes() -> impl Iterator<Item = u16> {
    CLOSE_CODES.into_iter().chain(MORE_CLOSE_CODES)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: i64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A family with one label: the header, then one sample per (label value,
/// value).
fn family<L: Display, V: Display>(
    out: &mut String,
    (name, kind): (&str, &str),
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) {
    header(out, name, kind, help);
    for (value_of_label, value) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value_of_label}\"}} {value}");
    }
}

/// One peer's link statistics, kept by the peer transport across
/// reconnects and rendered by [`render_peers`] with a `peer` label (cluster
/// members only, so the cluster size bounds the series).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    pub peer: NodeId,
    /// An authenticated connection to the peer is up.
    pub connected: bool,
    /// The connection's round-trip time estimate; `None` while disconnected.
    pub rtt: Option<Duration>,
    /// Frames written to the peer's stream, and their bytes on the stream
    /// (each frame plus its length prefix; no QUIC or UDP overhead).
    pub sent_frames: u64,
    pub sent_bytes: u64,
    /// Frames read from the peer's stream, counted like the sent ones.
    pub received_frames: u64,
    pub received_bytes: u64,
    /// Connections established to the peer after the first.
    pub reconnects: u64,
    /// Frames refused because the peer's send queue was full.
    pub send_queue_full: u64,
}

/// Appends the per-peer families (nothing when `peers` is empty).
pub fn render_peers(out: &mut String, peers: &[PeerStats]) {
    if peers.is_empty() {
        return;
    }
    fn family<V: Display>(
        out: &mut String,
        peers: &[PeerStats],
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&PeerStats) -> Option<V>,
    ) {
        header(out, name, kind, help);
        for stats in peers {
            if let Some(value) = value(stats) {
                let _ = write!(out, "{name}{{peer=\"");
                escape_label(out, &stats.peer);
                let _ = writeln!(out, "\"}} {value}");
            }
        }
    }
    family(
        out,
        peers,
        "herald_peer_connected",
        "gauge",
        "Whether an authenticated connection to the peer is up (1) or not (0).",
        |p| Some(u8::from(p.connected)),
    );
    family(
        out,
        peers,
        "herald_peer_rtt_seconds",
        "gauge",
        "Round-trip time estimate of the connection to the peer (connected peers only).",
        |p| p.rtt.map(|rtt| rtt.as_secs_f64()),
    );
    family(
        out,
        peers,
        "herald_peer_sent_frames_total",
        "counter",
        "Frames written to the peer.",
        |p| Some(p.sent_frames),
    );
    family(
        out,
        peers,
        "herald_peer_sent_bytes_total",
        "counter",
        "Frame bytes written to the peer, length prefixes included (no QUIC or UDP overhead).",
        |p| Some(p.sent_bytes),
    );
    family(
        out,
        peers,
        "herald_peer_received_frames_total",
        "counter",
        "Frames read from the peer.",
        |p| Some(p.received_frames),
    );
    family(
        out,
        peers,
        "herald_peer_received_bytes_total",
        "counter",
        "Frame bytes read from the peer, length prefixes included (no QUIC or UDP overhead).",
        |p| Some(p.received_bytes),
    );
    family(
        out,
        peers,
        "herald_peer_reconnects_total",
        "counter",
        "Connections established to the peer after the first.",
        |p| Some(p.reconnects),
    );
    family(
        out,
        peers,
        "herald_peer_send_queue_full_total",
        "counter",
        "Frames to the peer refused because its send queue was full.",
        |p| Some(p.send_queue_full),
    );
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Where [`render_all`] gets per-peer statistics from.
pub type PeerStatsSource = Box<dyn Fn() -> Vec<PeerStats> + Send + Sync>;

static PEER_STATS: OnceLock<PeerStatsSource> = OnceLock::new();

/// Registers the source of per-peer statistics (a clustered node's peer
/// transport). One per process: false, and ignored, if one is set already.
pub fn set_peer_stats_source(source: PeerStatsSource) -> bool {
    PEER_STATS.set(source).is_ok()
}

/// What the admin `/metrics` serves: [`METRICS`], then the per-peer
/// families of the registered source, if any.
pub fn render_all() -> String {
    let mut out = METRICS.render();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        gauge(
            &mut out,
            "herald_runtime_alive_tasks",
            "Tasks alive in the node's runtime: they follow sessions and peer links; a count that stays up after those are gone is a leak.",
            runtime.metrics().num_alive_tasks() as i64,
        );
    }
    if let Some(source) = PEER_STATS.get() {
        render_peers(&mut out, &source());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histogram_is_cumulative() {
        let m = Metrics::new();
        m.delivery_latency.observe_micros(300);
        m.delivery_latency.observe_micros(3_000);
        m.delivery_latency.observe_micros(10_000_000);
        let text = m.render();
        let name = "herald_publish_to_deliver_seconds";
        assert!(text.contains(&format!("{name}_bucket{{le=\"0.0005\"}} 1\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"0.005\"}} 2\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"2.5\"}} 2\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 3\n")));
        assert!(text.contains(&format!("{name}_count 3\n")));
        assert!(text.contains(&format!("{name}_sum 10.0033\n")));
    }

    #[test]
    fn renders_peer_families() {
        let mut text = String::new();
        render_peers(&mut text, &[]);
        assert_eq!(text, "");
        let up = PeerStats {
            peer: "n2".into(),
            connected: true,
            rtt: Some(Duration::from_micros(250)),
            sent_frames: 3,
            sent_bytes: 40,
            received_frames: 2,
            received_bytes: 30,
            reconnects: 1,
            send_queue_full: 4,
        };
        let down = PeerStats {
            peer: "n\"3".into(),
            connected: false,
            rtt: None,
            ..up.clone()
        };
        render_peers(&mut text, &[up, down]);
        for line in [
            "# TYPE herald_peer_rtt_seconds gauge\n",
            "herald_peer_rtt_seconds{peer=\"n2\"} 0.00025\n",
            "herald_peer_connected{peer=\"n2\"} 1\n",
            "herald_peer_connected{peer=\"n\\\"3\"} 0\n",
            "# TYPE herald_peer_sent_bytes_total counter\n",
            "herald_peer_sent_frames_total{peer=\"n2\"} 3\n",
            "herald_peer_sent_bytes_total{peer=\"n2\"} 40\n",
            "herald_peer_received_frames_total{peer=\"n2\"} 2\n",
            "herald_peer_received_bytes_total{peer=\"n2\"} 30\n",
            "herald_peer_reconnects_total{peer=\"n2\"} 1\n",
            "herald_peer_send_queue_full_total{peer=\"n2\"} 4\n",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
        assert!(!text.contains("herald_peer_rtt_seconds{peer=\"n\\\"3\"}"));
        assert_eq!(text.matches("# TYPE").count(), 8);
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.connects.inc();
        m.disconnected(Some(4001));
        m.disconnected(None);
        let text = m.render();
        assert!(text.contains("herald_connects_total 1\n"));
        assert!(text.contains("herald_disconnects_total{code=\"4001\"} 1\n"));
        assert!(text.contains("herald_disconnects_total{code=\"0\"} 1\n"));
        assert!(text.contains("# TYPE herald_connections gauge\n"));
    }
}
