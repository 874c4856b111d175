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
//!
//! # Configuration (the standard `OTEL_*` environment)
//!
//! - Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and not empty); otherwise
//!   [`enabled`] is false and [`message_span`] costs nothing.
//! - `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`:
//!   `http/protobuf` (the default; `POST {endpoint}/v1/traces`, or the traces
//!   endpoint as given) or `grpc` (tonic). `http/json` is not built in and
//!   falls back to `http/protobuf`. Neither transport has TLS (the exporter
//!   talks to a collector next to the node; this keeps aws-lc out).
//! - The exporter's own variables: `OTEL_EXPORTER_OTLP_{,TRACES_}HEADERS`,
//!   `..._TIMEOUT`; the batch's: `OTEL_BSP_SCHEDULE_DELAY` (ms, default
//!   5000), `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
//!   `OTEL_BSP_EXPORT_TIMEOUT`.
//! - Sampling: `ParentBased(TraceIdRatioBased(r))` with `r` from
//!   `OTEL_TRACES_SAMPLER_ARG` (default 1.0): a message that arrives with a
//!   `trace` follows its sampled flag, one without is sampled with
//!   probability `r`. `OTEL_TRACES_SAMPLER`, when set, picks another of the
//!   standard samplers instead.
//! - Resource: `service.name` from `OTEL_SERVICE_NAME` (default `herald`),
//!   `service.instance.id` = the node id, plus `OTEL_RESOURCE_ATTRIBUTES`.
//!
//! # What a hop passes on
//!
//! [`MessageSpan::traceparent`] is what the next hop (a peer frame, or a
//! delivered `msg`) carries:
//! - sampled: `00-<trace id>-<this span's id>-<parent's flags | 01>`;
//! - not sampled, with a parent: the parent itself with the sampled bit
//!   cleared (other flag bits kept). A hop that is not recorded leaves no
//!   span, so naming its id as a parent would point at nothing; passing the
//!   last recorded ancestor on keeps whatever a client records downstream
//!   attached to a span that may exist, and every later hop sees
//!   `sampled=0` and drops too (parent-based), so one message is traced on
//!   every node or on none;
//! - not sampled, no parent (a new trace the ratio left out): the new trace
//!   id, this (unrecorded) span's id, flags `00`.
//!
//! The `tracestate` is not part of [`TraceParent`]: callers pass it on
//! verbatim; here it only becomes the exported spans' trace state.
//!
//! # Logs
//!
//! Text lines show the fields of every span they are logged in
//! (`session{node_id=n1 session_id=7}:herald.deliver{topic=a ...}: ...`).
//! JSON lines (`log.format = "json"`) are one flat object: `timestamp`,
//! `level`, `message`, `target`, `span` (the innermost span's name), then
//! the fields of every span in scope and the event's own (inner ones win:
//! a line in a message span has `trace_id`, `topic`, `seq`, one in a
//! session span `node_id` and `session_id`). Every line has `node_id`: the
//! node's own when no span or field gives one.
//!
//! Each message span, when it ends, logs one `debug` line in itself
//! ("message hop done"): with `RUST_LOG=node::telemetry=debug` the log
//! shows every hop of every traced message with its `trace_id`.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use protocol::TraceParent;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::{FormatEvent, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter, EnvFilter, Registry};

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

impl Hop {
    /// The span's name.
    pub fn span_name(self) -> &'static str {
        match self {
            Hop::Publish => "herald.publish",
            Hop::Sequence => "herald.sequence",
            Hop::Deliver => "herald.deliver",
        }
    }
}

/// A message's span on this node, or nothing when tracing is off (then it
/// costs no allocation).
#[derive(Debug, Default)]
pub struct MessageSpan {
    span: Option<tracing::Span>,
    context: Option<TraceParent>,
}

impl MessageSpan {
    /// This hop's trace context for the next hop (see the module docs for
    /// what it is when the span was not sampled); `None` when tracing is
    /// off.
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

impl Drop for MessageSpan {
    fn drop(&mut self) {
        // The hop's one log line, in its span (so with its trace id, topic
        // and seq); only at debug, and only when tracing is on.
        if let Some(span) = &self.span {
            tracing::debug!(parent: span, "message hop done");
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// True while the sampler is the default parent-based one (a custom
/// `OTEL_TRACES_SAMPLER` may record spans whose parent was not sampled).
static PARENT_BASED: AtomicBool = AtomicBool::new(true);
static NODE_ID: OnceLock<String> = OnceLock::new();

/// True when spans are exported (an OTLP endpoint is configured and the
/// exporter was built).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Starts the span of one hop of a message. `parent` is the previous hop's
/// (or the publisher's) context, `tracestate` its `tracestate`; without a
/// parent, a new trace starts (sampled with the configured ratio).
pub fn message_span(
    hop: Hop,
    parent: Option<&TraceParent>,
    tracestate: Option<&str>,
    topic: &str,
) -> MessageSpan {
    if !enabled() {
        return MessageSpan::default();
    }
    let unsampled_parent = parent.filter(|p| p.flags & TraceParent::SAMPLED == 0);
    if let Some(p) = unsampled_parent.filter(|_| PARENT_BASED.load(Ordering::Relaxed)) {
        // The parent-based sampler would drop this span: skip building it
        // (most of tracing's cost at low ratios) and pass the parent on, as
        // an unrecorded span does.
        return MessageSpan {
            span: None,
            context: Some(*p),
        };
    }
    let node_id = NODE_ID.get().map_or("", String::as_str);
    traced_span(hop, parent, tracestate, topic, node_id)
}

/// [`message_span`] without the [`enabled`] check: the span goes to the
/// current dispatcher (whose OpenTelemetry layer, if any, decides).
fn traced_span(
    hop: Hop,
    parent: Option<&TraceParent>,
    tracestate: Option<&str>,
    topic: &str,
    node_id: &str,
) -> MessageSpan {
    use tracing::field::Empty;
    // Names and `otel.kind` must be literals: one macro call per hop.
    let span = match hop {
        Hop::Publish => tracing::info_span!(
            "herald.publish",
            topic,
            seq = Empty,
            node_id,
            trace_id = Empty,
            otel.kind = "producer",
        ),
        Hop::Sequence => tracing::info_span!(
            "herald.sequence",
            topic,
            seq = Empty,
            node_id,
            trace_id = Empty,
            otel.kind = "internal",
        ),
        Hop::Deliver => tracing::info_span!(
            "herald.deliver",
            topic,
            seq = Empty,
            node_id,
            trace_id = Empty,
            otel.kind = "consumer",
        ),
    };
    // The parent must be set before the span is entered or its context
    // read (both start the OpenTelemetry span). An empty context makes it a
    // root even inside another traced span.
    let parent_cx = match parent {
        Some(tp) => opentelemetry::Context::new()
            .with_remote_span_context(remote_span_context(tp, tracestate)),
        None => opentelemetry::Context::new(),
    };
    if span.set_parent(parent_cx).is_err() {
        // No OpenTelemetry layer saw the span (disabled or filtered out):
        // this hop is transparent.
        return MessageSpan {
            span: Some(span),
            context: parent.copied(),
        };
    }
    let cx = span.context();
    let own = cx.span().span_context().clone();
    if !own.is_valid() {
        return MessageSpan {
            span: Some(span),
            context: parent.copied(),
        };
    }
    let trace_id = own.trace_id().to_bytes();
    span.record("trace_id", tracing::field::display(own.trace_id()));
    let context = match parent {
        Some(p) if own.is_sampled() => TraceParent {
            trace_id,
            parent_id: own.span_id().to_bytes(),
            flags: p.flags | TraceParent::SAMPLED,
        },
        // Not recorded: pass the parent on, marked not sampled.
        Some(p) => TraceParent {
            flags: p.flags & !TraceParent::SAMPLED,
            ..*p
        },
        None => TraceParent {
            trace_id,
            parent_id: own.span_id().to_bytes(),
            flags: if own.is_sampled() {
                TraceParent::SAMPLED
            } else {
                0
            },
        },
    };
    MessageSpan {
        span: Some(span),
        context: Some(context),
    }
}

fn remote_span_context(tp: &TraceParent, tracestate: Option<&str>) -> SpanContext {
    let state = tracestate
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(tp.trace_id),
        SpanId::from_bytes(tp.parent_id),
        TraceFlags::new(tp.flags),
        true,
        state,
    )
}

/// Logging only, never tracing (kept for callers that do not export
/// spans; the `herald` binary uses [`init`]).
pub fn init_logging(format: LogFormat) {
    install_subscriber(format, None);
}

/// Starts logging and, when an OTLP endpoint is configured, span export
/// for node `node_id`. Keep the returned guard until the process ends and
/// call [`Telemetry::shutdown`] (or drop it) outside the async runtime, after
/// `block_on` returned: it flushes the spans still queued.
pub fn init(format: LogFormat, node_id: &str) -> Telemetry {
    let _ = NODE_ID.set(node_id.to_owned());
    let settings = TraceSettings::from_env();
    let (exported, error) = match &settings {
        Some(settings) => match build_provider(settings, node_id) {
            Ok(exported) => (Some(exported), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    let tracer = exported.as_ref().map(|e| {
        e.provider.tracer_with_scope(
            InstrumentationScope::builder("herald")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
    });
    install_subscriber(format, tracer);
    for warning in settings.iter().flat_map(|s| &s.warnings) {
        tracing::warn!("{warning}");
    }
    if let Some(e) = error {
        tracing::warn!(error = %e, "span export is off: the OTLP exporter could not be built");
    }
    let mut telemetry = Telemetry {
        provider: None,
        runtime: None,
    };
    if let Some(exported) = exported {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(exported.provider.clone());
        ENABLED.store(true, Ordering::Relaxed);
        if let Some(settings) = &settings {
            tracing::info!(
                protocol = settings.protocol.as_str(),
                sampler = %settings.sampler_text,
                "exporting spans over OTLP"
            );
        }
        telemetry.provider = Some(exported.provider);
        telemetry.runtime = exported.runtime;
    }
    telemetry
}

/// Span export, while it runs. [`Telemetry::shutdown`] (or dropping it)
/// flushes the queued spans and stops the exporter.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The gRPC exporter's own runtime (tonic needs one; the node's is gone
    /// by the time the last spans are flushed).
    runtime: Option<tokio::runtime::Runtime>,
}

/// How long the final flush may take.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

impl Telemetry {
    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes the spans still queued and shuts the exporter down, waiting
    /// at most a few seconds. It blocks the calling thread (the work runs
    /// on a thread of its own, never on a runtime worker): call it from
    /// `main`, not from async code.
    pub fn shutdown(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        ENABLED.store(false, Ordering::Relaxed);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("herald-otel-shutdown".into())
            .spawn(move || {
                let _ = done_tx.send(provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
            });
        match spawned {
            Ok(_) => match done_rx.recv_timeout(SHUTDOWN_TIMEOUT + Duration::from_secs(1)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "flushing spans at shutdown failed"),
                Err(_) => tracing::warn!("flushing spans at shutdown did not finish in time"),
            },
            Err(e) => tracing::warn!(error = %e, "could not start the span flush at shutdown"),
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.finish();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    HttpProtobuf,
    Grpc,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::Grpc => "grpc",
        }
    }
}

/// What the `OTEL_*` environment asks for; `None` when no endpoint is set.
#[derive(Debug)]
struct TraceSettings {
    protocol: Protocol,
    /// Set only when `OTEL_TRACES_SAMPLER` is not (then the SDK reads it).
    sampler: Option<Sampler>,
    sampler_text: String,
    service_name: Option<String>,
    warnings: Vec<String>,
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

impl TraceSettings {
    fn from_env() -> Option<TraceSettings> {
        env_nonempty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
        let mut warnings = Vec::new();
        let protocol = match env_nonempty("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => {
                warnings.push(format!(
                    "OTLP protocol {other:?} is not supported; using http/protobuf"
                ));
                Protocol::HttpProtobuf
            }
        };
        let (sampler, sampler_text) = if let Some(name) = env_nonempty("OTEL_TRACES_SAMPLER") {
            PARENT_BASED.store(name.starts_with("parentbased"), Ordering::Relaxed);
            (None, format!("{name} (OTEL_TRACES_SAMPLER)"))
        } else {
            let ratio = match env_nonempty("OTEL_TRACES_SAMPLER_ARG") {
                None => 1.0,
                Some(arg) => match arg.parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => r,
                    _ => {
                        warnings.push(format!(
                            "OTEL_TRACES_SAMPLER_ARG={arg:?} is not a ratio in [0, 1]; using 1.0"
                        ));
                        1.0
                    }
                },
            };
            (
                Some(parent_based_ratio(ratio)),
                format!("parentbased_traceidratio({ratio})"),
            )
        };
        // The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        // itself; herald is the name when neither gives one.
        let named = env_nonempty("OTEL_SERVICE_NAME").is_some()
            || env_nonempty("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
                attrs
                    .split(',')
                    .any(|kv| kv.trim().starts_with("service.name="))
            });
        Some(TraceSettings {
            protocol,
            sampler,
            sampler_text,
            service_name: (!named).then(|| "herald".to_owned()),
            warnings,
        })
    }
}

fn parent_based_ratio(ratio: f64) -> Sampler {
    Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
}

struct Exported {
    provider: SdkTracerProvider,
    runtime: Option<tokio::runtime::Runtime>,
}

fn build_provider(settings: &TraceSettings, node_id: &str) -> Result<Exported, String> {
    let mut runtime = None;
    let exporter = match settings.protocol {
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build(),
        Protocol::Grpc => {
            // tonic's channel spawns its connection tasks on the runtime it
            // is built in: give it one that outlives the node's.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("herald-otel")
                .enable_all()
                .build()
                .map_err(|e| format!("starting the gRPC exporter's runtime: {e}"))?;
            let exporter = {
                let _entered = rt.enter();
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
            };
            runtime = Some(rt);
            exporter
        }
    }
    .map_err(|e| e.to_string())?;
    let mut resource = Resource::builder();
    if let Some(name) = &settings.service_name {
        resource = resource.with_service_name(name.clone());
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.instance.id", node_id.to_owned()))
        .build();
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter);
    if let Some(sampler) = &settings.sampler {
        builder = builder.with_sampler(sampler.clone());
    }
    Ok(Exported {
        provider: builder.build(),
        runtime,
    })
}

/// The OpenTelemetry layer takes message spans (this module's target) and
/// warnings and errors logged inside them (as span events), nothing else:
/// session and other spans stay in the logs. Its own crates' logs are kept
/// out, so that exporting never feeds itself.
fn otel_filter(meta: &Metadata<'_>) -> bool {
    if meta.is_span() {
        meta.target() == module_path!()
    } else {
        *meta.level() <= Level::WARN && !meta.target().starts_with("opentelemetry")
    }
}

fn otel_layer<S>(tracer: opentelemetry_sdk::trace::Tracer) -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_filter(filter::filter_fn(otel_filter))
}

/// `RUST_LOG`, else `info` (the OpenTelemetry crates' own chatter only
/// from `warn`: export failures still show).
fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry-otlp=warn")
    })
}

fn fmt_layer(format: LogFormat) -> Box<dyn Layer<Registry> + Send + Sync> {
    // Colour codes only for a terminal, never in files or journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(env_filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson::for_node(NODE_ID.get().cloned()))
            .with_filter(env_filter())
            .boxed(),
    }
}

fn install_subscriber(format: LogFormat, tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    let otel = tracer.map(otel_layer::<Registry>);
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![fmt_layer(format)];
    if let Some(otel) = otel {
        layers.push(Box::new(otel));
    }
    if let Err(e) = tracing_subscriber::registry().with(layers).try_init() {
        eprintln!("herald: logging already initialised: {e}");
    }
}

/// One JSON object per line with the fields of every span in scope merged
/// in (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct FlatJson {
    /// `node_id` of the lines that get none from their spans or fields.
    node_id: Option<String>,
}

impl FlatJson {
    /// Lines of node `node_id` (`None`: no default `node_id`).
    pub fn for_node(node_id: Option<String>) -> FlatJson {
        FlatJson { node_id }
    }
}

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        use tracing_log::NormalizeEvent as _;
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());

        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;

        let mut fields = serde_json::Map::new();
        let mut innermost = None;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(formatted) = extensions.get::<FormattedFields<JsonFields>>() {
                    if let Ok(serde_json::Value::Object(map)) =
                        serde_json::from_str::<serde_json::Value>(formatted)
                    {
                        fields.extend(map);
                    }
                }
                innermost = Some(span.name());
            }
        }
        let mut visitor = JsonVisitor {
            fields: &mut fields,
        };
        event.record(&mut visitor);
        let message = fields.remove("message");
        if let Some(node_id) = &self.node_id {
            fields
                .entry("node_id")
                .or_insert_with(|| node_id.as_str().into());
        }

        // Fixed keys first, then the fields (sorted); a field named like a
        // fixed key is left out.
        let mut line = String::with_capacity(256);
        let mut put = |key: &str, value: &serde_json::Value| -> fmt::Result {
            line.push(if line.is_empty() { '{' } else { ',' });
            line.push_str(&serde_json::to_string(key).map_err(|_| fmt::Error)?);
            line.push(':');
            line.push_str(&serde_json::to_string(value).map_err(|_| fmt::Error)?);
            Ok(())
        };
        put("timestamp", &timestamp.into())?;
        put("level", &meta.level().as_str().into())?;
        if let Some(message) = &message {
            put("message", message)?;
        }
        put("target", &meta.target().into())?;
        if let Some(name) = innermost {
            put("span", &name.into())?;
        }
        for (key, value) in &fields {
            if !matches!(
                key.as_str(),
                "timestamp" | "level" | "message" | "target" | "span"
            ) {
                put(key, value)?;
            }
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// Event fields as JSON values (`log.*` fields of `log` records are left
/// out: they are the target and location, already normalised).
struct JsonVisitor<'a> {
    fields: &'a mut serde_json::Map<String, serde_json::Value>,
}

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if !field.name().starts_with("log.") {
            self.fields.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanKind, TraceState};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A subscriber with the same OpenTelemetry layer as `init`, exporting
    /// synchronously to memory.
    fn with_tracing<R>(ratio: f64, f: impl FnOnce() -> R) -> (R, Vec<SpanData>) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .with_sampler(parent_based_ratio(ratio))
            .build();
        let tracer = provider.tracer("test");
        let subscriber = tracing_subscriber::registry().with(otel_layer(tracer));
        let out = tracing::subscriber::with_default(subscriber, f);
        let _ = provider.force_flush();
        (out, exporter.get_finished_spans().expect("finished spans"))
    }

    fn hop(hop: Hop, parent: Option<&TraceParent>, tracestate: Option<&str>) -> MessageSpan {
        traced_span(hop, parent, tracestate, "a.b", "n1")
    }

    fn attr(span: &SpanData, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[test]
    fn child_of_the_given_traceparent() {
        let parent = TraceParent::parse(PARENT).unwrap();
        let (context, spans) = with_tracing(1.0, || {
            let span = hop(Hop::Publish, Some(&parent), None);
            span.record_seq(7);
            span.traceparent()
        });
        let context = context.expect("a context");
        assert_eq!(spans.len(), 1);
        let span = &spans[0];
        assert_eq!(span.name, "herald.publish");
        assert_eq!(span.span_kind, SpanKind::Producer);
        assert_eq!(span.span_context.trace_id().to_bytes(), parent.trace_id);
        assert_eq!(span.parent_span_id.to_bytes(), parent.parent_id);
        assert!(span.parent_span_is_remote);
        assert_eq!(attr(span, "topic").as_deref(), Some("a.b"));
        assert_eq!(attr(span, "seq").as_deref(), Some("7"));
        assert_eq!(attr(span, "node_id").as_deref(), Some("n1"));
        // The context handed on: same trace, this span as the parent.
        assert_eq!(context.trace_id, parent.trace_id);
        assert_ne!(context.parent_id, parent.parent_id);
        assert_eq!(context.parent_id, span.span_context.span_id().to_bytes());
        assert!(context.sampled());
        assert_eq!(
            context.to_string(),
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                span.span_context.span_id()
            )
        );
    }

    #[test]
    fn hops_chain_into_one_trace() {
        let client = TraceParent::parse(PARENT).unwrap();
        let ((p, s, d), spans) = with_tracing(1.0, || {
            let p = hop(Hop::Publish, Some(&client), None)
                .traceparent()
                .unwrap();
            let s = hop(Hop::Sequence, Some(&p), None).traceparent().unwrap();
            let deliver = hop(Hop::Deliver, Some(&s), None);
            // Entering after the parent was set is fine.
            let _entered = deliver.span().map(|s| s.enter());
            (p, s, deliver.traceparent().unwrap())
        });
        let by_name = |n: &str| spans.iter().find(|s| s.name == n).expect(n);
        let (publish, sequence, deliver) = (
            by_name("herald.publish"),
            by_name("herald.sequence"),
            by_name("herald.deliver"),
        );
        assert_eq!(publish.parent_span_id.to_bytes(), client.parent_id);
        assert_eq!(sequence.parent_span_id, publish.span_context.span_id());
        assert_eq!(deliver.parent_span_id, sequence.span_context.span_id());
        assert_eq!(sequence.span_kind, SpanKind::Internal);
        assert_eq!(deliver.span_kind, SpanKind::Consumer);
        for (tp, span) in [(p, publish), (s, sequence), (d, deliver)] {
            assert_eq!(tp.trace_id, client.trace_id);
            assert_eq!(tp.parent_id, span.span_context.span_id().to_bytes());
        }
    }

    #[test]
    fn tracestate_is_kept() {
        let parent = TraceParent::parse(PARENT).unwrap();
        let (_, spans) = with_tracing(1.0, || {
            hop(
                Hop::Sequence,
                Some(&parent),
                Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            )
            .traceparent()
        });
        assert_eq!(
            spans[0].span_context.trace_state().header(),
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
        );
        // An invalid one is no trace state, not an error.
        let (context, spans) = with_tracing(1.0, || {
            hop(Hop::Sequence, Some(&parent), Some("not valid")).traceparent()
        });
        assert!(context.is_some());
        assert_eq!(spans[0].span_context.trace_state(), &TraceState::default());
    }

    #[test]
    fn sampled_flag_is_honoured() {
        // Not sampled upstream: nothing is recorded, even at ratio 1, and
        // the parent is passed on unsampled (other flag bits kept).
        let mut unsampled = TraceParent::parse(PARENT).unwrap();
        unsampled.flags = 0x02;
        let (context, spans) = with_tracing(1.0, || {
            hop(Hop::Publish, Some(&unsampled), None).traceparent()
        });
        assert!(spans.is_empty());
        assert_eq!(context, Some(unsampled));

        // Sampled upstream: recorded even at ratio 0.
        let sampled = TraceParent::parse(PARENT).unwrap();
        let (context, spans) = with_tracing(0.0, || {
            hop(Hop::Publish, Some(&sampled), None).traceparent()
        });
        assert_eq!(spans.len(), 1);
        assert!(context.unwrap().sampled());
    }

    #[test]
    fn without_a_parent_a_trace_starts() {
        let (context, spans) = with_tracing(1.0, || {
            // Inside another message span: still a root of its own.
            let outer = hop(Hop::Deliver, None, None);
            let _entered = outer.span().map(|s| s.enter());
            hop(Hop::Publish, None, None).traceparent()
        });
        let context = context.unwrap();
        let publish = spans.iter().find(|s| s.name == "herald.publish").unwrap();
        assert_eq!(publish.parent_span_id, SpanId::INVALID);
        assert_eq!(publish.span_context.trace_id().to_bytes(), context.trace_id);
        assert_eq!(publish.span_context.span_id().to_bytes(), context.parent_id);
        assert_eq!(context.flags, TraceParent::SAMPLED);

        // Ratio 0: not recorded, but downstream still gets a trace to follow.
        let (context, spans) = with_tracing(0.0, || hop(Hop::Publish, None, None).traceparent());
        assert!(spans.is_empty());
        let context = context.unwrap();
        assert_eq!(context.flags, 0);
        assert_ne!(context.trace_id, [0; 16]);
    }

    #[test]
    fn disabled_means_nothing() {
        // `init` never runs in unit tests, so tracing is off.
        assert!(!enabled());
        let parent = TraceParent::parse(PARENT).unwrap();
        let span = message_span(Hop::Publish, Some(&parent), Some("k=v"), "a.b");
        assert!(span.traceparent().is_none());
        assert!(span.span().is_none());
        span.record_seq(1);
    }

    #[test]
    fn without_an_otel_layer_a_hop_is_transparent() {
        let parent = TraceParent::parse(PARENT).unwrap();
        let subscriber = tracing_subscriber::registry();
        let context = tracing::subscriber::with_default(subscriber, || {
            traced_span(Hop::Deliver, Some(&parent), None, "a.b", "n1").traceparent()
        });
        assert_eq!(context, Some(parent));
    }

    #[test]
    fn json_lines_carry_span_fields() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter)
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || writer.clone())
                    .with_ansi(false)
                    .fmt_fields(JsonFields::new())
                    .event_format(FlatJson::for_node(Some("n9".into()))),
            )
            .with(otel_layer(provider.tracer("test")));
        let parent = TraceParent::parse(PARENT).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let session = tracing::info_span!("session", node_id = "n1", session_id = 42u64);
            let _s = session.enter();
            tracing::info!(reason = "x", "in the session");
            let span = hop(Hop::Deliver, Some(&parent), None);
            span.record_seq(3);
            let _m = span.span().map(|s| s.enter());
            tracing::warn!("in the message");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 4, "{text}");
        // The node's own id when no span gives one.
        assert_eq!(lines[0]["message"], "outside");
        assert_eq!(lines[0]["node_id"], "n9");
        assert!(lines[0].get("span").is_none());
        let lines = &lines[1..];
        assert_eq!(lines[0]["message"], "in the session");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["node_id"], "n1");
        assert_eq!(lines[0]["session_id"], 42);
        assert_eq!(lines[0]["reason"], "x");
        assert_eq!(lines[0]["span"], "session");
        assert_eq!(lines[1]["message"], "in the message");
        assert_eq!(lines[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(lines[1]["session_id"], 42);
        assert_eq!(lines[1]["seq"], 3);
        assert_eq!(lines[1]["topic"], "a.b");
        assert_eq!(lines[1]["span"], "herald.deliver");
        assert!(lines[1]["timestamp"].is_string());
        // The hop's own line when its span ends.
        assert_eq!(lines[2]["message"], "message hop done");
        assert_eq!(lines[2]["level"], "DEBUG");
        assert_eq!(lines[2]["span"], "herald.deliver");
        assert_eq!(lines[2]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(lines[2]["seq"], 3);
        assert_eq!(lines[2]["node_id"], "n1");
    }
}
