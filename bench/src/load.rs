//! Options shared by the load scenarios (`fanout`, `topics`): protocol,
//! payload, pacing, subscriber processes and time limits.

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::session::{Codec, ParseMode, Target};

/// How a publisher learns that its messages were taken, which is what its
/// window of unconfirmed messages counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confirm {
    /// Herald: every `pub` carries an `id`, and its `ok` (sent once the
    /// topic's owner sequenced it, possibly on another node) confirms it.
    /// NATS has no such reply and uses `ping` instead.
    Ack,
    /// Both brokers: no per-message reply; a ping after every `window / 4`
    /// messages, and its pong (sent once the node took every earlier
    /// message of the connection) confirms them.
    Ping,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Broker protocol.
    #[arg(long, value_enum, default_value = "herald")]
    pub target: Target,
    /// Herald codec.
    #[arg(long, value_enum, default_value = "json")]
    pub codec: Codec,
    /// How subscribers read Herald frames.
    #[arg(long, value_enum, default_value = "scan")]
    pub parse: ParseMode,
    /// Payload size in bytes.
    #[arg(short = 'b', long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Messages per second over all publishers; 0 publishes as fast as confirmations allow.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Most unconfirmed messages in flight per publisher connection.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// How publishes are confirmed (NATS always uses ping).
    #[arg(long, value_enum, default_value = "ack")]
    pub confirm: Confirm,
    /// Child processes holding the subscribers.
    #[arg(long, default_value_t = 1)]
    pub sub_procs: usize,
    /// Tokio worker threads per subscriber process.
    #[arg(long, default_value_t = 2)]
    pub sub_threads: usize,
    /// Pause between the last confirmed subscription and the first publish.
    /// Default: 0 for herald (its `ok` means the subscription is live
    /// cluster-wide), 1 s for nats with several URLs (a `PONG` only confirms
    /// the local server; routes learn of the interest a little later).
    #[arg(long)]
    pub settle_secs: Option<f64>,
    /// After publishing, stop waiting when no delivery arrived for this many seconds.
    #[arg(long, default_value_t = 3.0)]
    pub drain_secs: f64,
    /// Give up on the whole run after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout_secs: f64,
    /// Concurrent connection handshakes per subscriber process.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
    /// Also print the summary as one `JSON {...}` line.
    #[arg(long)]
    pub json: bool,
}
