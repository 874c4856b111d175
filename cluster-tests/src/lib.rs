//! Harness for Herald's end-to-end tests: real `herald` processes (see
//! [`node`]) driven by real clients over WebSocket ([`ws`]) and HTTP
//! ([`http`]), with a reader for `/metrics` ([`metrics`]), JWT minting
//! ([`jwt`]), cluster certificates ([`certs`]) and an OTLP trace receiver
//! ([`otlp`]).
//!
//! Tests run in parallel threads; every node gets its own ports and its own
//! scratch directory, and every wait is bounded.

pub mod certs;
pub mod http;
pub mod jwt;
pub mod metrics;
pub mod node;
pub mod otlp;
pub mod ws;

pub use certs::{Ca, NodeCert};
pub use http::HttpResponse;
pub use metrics::{Metrics, PeerMetrics};
pub use node::{herald_bin, Cluster, Node, NodeBuilder};
pub use ws::{b64, check_err, mp_bin, seq_epoch, Codec, Ended, WsClient, WsConnect, MSGPACK};

/// A short pause for "nothing more arrives" checks.
pub const QUIET: std::time::Duration = std::time::Duration::from_millis(300);
