//! A minimal OTLP trace receiver, as a collector would be. On one port it
//! serves both transports the OpenTelemetry exporters speak (it tells them
//! apart by the HTTP/2 connection preface):
//!
//! - OTLP/HTTP: `POST /v1/traces` over HTTP/1.1 with an
//!   `ExportTraceServiceRequest` in protobuf, answered 200 with an empty
//!   `ExportTraceServiceResponse`;
//! - OTLP/gRPC: `POST /opentelemetry.proto.collector.trace.v1.TraceService/Export`
//!   over cleartext HTTP/2 with prior knowledge (what tonic speaks to an
//!   `http://` endpoint), the request a gRPC length-prefixed message, answered
//!   200 `application/grpc` with a length-prefixed empty response and the
//!   trailer `grpc-status: 0`.
//!
//! Every span received is kept, flattened with its resource's
//! `service.name` and `service.instance.id` and the transport it came by,
//! for tests to look at.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tokio::net::{TcpListener, TcpStream};

/// The path of the gRPC export method.
pub const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// What every HTTP/2 connection starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The OTLP transports the receiver serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP/1.1 (`POST /v1/traces`).
    HttpProtobuf,
    /// gRPC over cleartext HTTP/2.
    Grpc,
}

impl OtlpProtocol {
    /// Its name in `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn env_value(self) -> &'static str {
        match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::Grpc => "grpc",
        }
    }
}

/// One received span, ids in lowercase hex (an absent parent is "").
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub trace_state: String,
    pub name: String,
    pub kind: SpanKind,
    /// The span's attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// Its resource's attributes, values as text.
    pub resource: BTreeMap<String, String>,
    /// The transport it arrived by.
    pub protocol: OtlpProtocol,
}

impl ReceivedSpan {
    /// The resource's `service.instance.id` (the node id for herald).
    pub fn instance_id(&self) -> Option<&str> {
        self.resource.get("service.instance.id").map(String::as_str)
    }

    pub fn service_name(&self) -> Option<&str> {
        self.resource.get("service.name").map(String::as_str)
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Debug, Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    requests: usize,
    /// Requests that were not a valid export (wrong path, method, body).
    rejected: Vec<String>,
}

/// The receiver, listening on 127.0.0.1 until dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    /// Binds 127.0.0.1:0 and starts serving both OTLP/HTTP and OTLP/gRPC
    /// (on the current runtime).
    pub async fn start() -> Result<OtlpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the OTLP receiver")?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Received::default()));
        let shared = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_connection(stream, shared.clone()));
            }
        });
        Ok(OtlpReceiver {
            addr,
            received,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT` (either
    /// protocol).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.lock().expect("receiver state").spans.clone()
    }

    /// How many export requests arrived (accepted or not).
    pub fn requests(&self) -> usize {
        self.received.lock().expect("receiver state").requests
    }

    /// Requests that were refused, and why.
    pub fn rejected(&self) -> Vec<String> {
        self.received
            .lock()
            .expect("receiver state")
            .rejected
            .clone()
    }

    /// The spans of trace `trace_id` (hex).
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Polls until `check` holds for the spans received, for at most
    /// `timeout`; returns them. `what` names the condition in the error,
    /// which lists what did arrive.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if check(&spans) {
                return Ok(spans);
            }
            if Instant::now() > deadline {
                bail!(
                    "OTLP receiver: {what}: not within {timeout:?}; {} requests, rejected {:?}, spans:\n{}",
                    self.requests(),
                    self.rejected(),
                    describe(&spans)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One line per span, for error messages.
pub fn describe(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  {} trace={} span={} parent={} kind={:?} node={} via={} attrs={:?}",
                s.name,
                s.trace_id,
                s.span_id,
                s.parent_span_id,
                s.kind,
                s.instance_id().unwrap_or("?"),
                s.protocol.env_value(),
                s.attributes
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

type Body = BoxBody<Bytes, Infallible>;

/// Serves one connection: HTTP/2 if it opens with the HTTP/2 preface (h2c
/// with prior knowledge), else HTTP/1.1.
async fn serve_connection(stream: TcpStream, received: Arc<Mutex<Received>>) {
    let Ok(http2) = opens_with_h2_preface(&stream).await else {
        return;
    };
    let io = TokioIo::new(stream);
    let service = hyper::service::service_fn(move |req| {
        let received = received.clone();
        async move { Ok::<_, Infallible>(handle(req, &received).await) }
    });
    if http2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    }
}

/// Peeks (without consuming) until the first bytes match the HTTP/2
/// preface or differ from it; a client that says nothing for 5 s is an
/// error.
async fn opens_with_h2_preface(stream: &TcpStream) -> std::io::Result<bool> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // Only part of the preface so far: peek returns at once while
        // anything is buffered, so wait a little for the rest.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn handle(req: Request<Incoming>, received: &Mutex<Received>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let grpc = parts.version == Version::HTTP_2;
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if grpc => return grpc_refuse(received, GRPC_INTERNAL, format!("body: {e}")),
        Err(e) => return refuse(received, StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    received.lock().expect("receiver state").requests += 1;
    if grpc {
        handle_grpc(&parts, &body, received)
    } else {
        handle_http(&parts, body, received)
    }
}

/// OTLP/HTTP: `POST /v1/traces`, protobuf both ways.
fn handle_http(parts: &Parts, body: Bytes, received: &Mutex<Received>) -> Response<Body> {
    if parts.method != Method::POST || parts.uri.path() != "/v1/traces" {
        return refuse(
            received,
            StatusCode::NOT_FOUND,
            format!("{} {}", parts.method, parts.uri),
        );
    }
    let content_type = content_type(parts);
    if content_type != "application/x-protobuf" {
        return refuse(
            received,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-type {content_type:?}"),
        );
    }
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(request) => request,
        Err(e) => return refuse(received, StatusCode::BAD_REQUEST, format!("decode: {e}")),
    };
    keep(received, request, OtlpProtocol::HttpProtobuf);
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/x-protobuf")
        .body(
            Full::new(Bytes::from(
                ExportTraceServiceResponse::default().encode_to_vec(),
            ))
            .boxed(),
        )
        .expect("static response")
}

/// gRPC status codes the receiver answers with.
const GRPC_OK: u32 = 0;
const GRPC_INVALID_ARGUMENT: u32 = 3;
const GRPC_UNIMPLEMENTED: u32 = 12;
const GRPC_INTERNAL: u32 = 13;

/// OTLP/gRPC: the `Export` method, one length-prefixed protobuf message
/// each way, the status in the trailers.
fn handle_grpc(parts: &Parts, body: &[u8], received: &Mutex<Received>) -> Response<Body> {
    if parts.method != Method::POST || parts.uri.path() != GRPC_EXPORT_PATH {
        return grpc_refuse(
            received,
            GRPC_UNIMPLEMENTED,
            format!("gRPC {} {}", parts.method, parts.uri),
        );
    }
    let content_type = content_type(parts);
    if content_type != "application/grpc" && content_type != "application/grpc+proto" {
        return grpc_refuse(
            received,
            GRPC_INVALID_ARGUMENT,
            format!("gRPC content-type {content_type:?}"),
        );
    }
    let request = match grpc_message(body)
        .and_then(|m| ExportTraceServiceRequest::decode(m).map_err(|e| format!("decode: {e}")))
    {
        Ok(request) => request,
        Err(why) => return grpc_refuse(received, GRPC_INVALID_ARGUMENT, why),
    };
    keep(received, request, OtlpProtocol::Grpc);
    grpc_response(
        Some(grpc_frame(
            &ExportTraceServiceResponse::default().encode_to_vec(),
        )),
        GRPC_OK,
        None,
    )
}

fn content_type(parts: &Parts) -> &str {
    parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The message of a gRPC request body: a 1-byte compressed flag (this
/// receiver accepts no `grpc-encoding`, so it must be 0), a 4-byte
/// big-endian length, then exactly that many bytes.
fn grpc_message(body: &[u8]) -> Result<&[u8], String> {
    let [flag, a, b, c, d, message @ ..] = body else {
        return Err(format!(
            "gRPC body of {} bytes has no message prefix",
            body.len()
        ));
    };
    if *flag != 0 {
        return Err(format!("gRPC message compressed (flag {flag})"));
    }
    let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    if message.len() != len {
        return Err(format!(
            "gRPC prefix announces {len} bytes, the body holds {}",
            message.len()
        ));
    }
    Ok(message)
}

/// `message` with its gRPC prefix (not compressed).
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).expect("message under 4 GiB"));
    framed.put_slice(message);
    framed.freeze()
}

/// A gRPC answer: HTTP 200, the message (if any), then the status as
/// trailers.
fn grpc_response(message: Option<Bytes>, status: u32, why: Option<&str>) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    if let Some(value) = why.and_then(|w| HeaderValue::from_str(w).ok()) {
        trailers.insert("grpc-message", value);
    }
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = message
        .map(Frame::data)
        .into_iter()
        .chain([Frame::trailers(trailers)])
        .map(Ok)
        .collect();
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/grpc")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .expect("static response")
}

fn grpc_refuse(received: &Mutex<Received>, status: u32, why: String) -> Response<Body> {
    let response = grpc_response(None, status, Some(&why));
    received.lock().expect("receiver state").rejected.push(why);
    response
}

/// Keeps every span of an accepted export.
fn keep(received: &Mutex<Received>, request: ExportTraceServiceRequest, protocol: OtlpProtocol) {
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                spans.push(ReceivedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    trace_state: span.trace_state.clone(),
                    kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                    name: span.name.clone(),
                    attributes: attributes(&span.attributes),
                    resource: resource.clone(),
                    protocol,
                });
            }
        }
    }
    received.lock().expect("receiver state").spans.extend(spans);
}

fn refuse(received: &Mutex<Received>, status: StatusCode, why: String) -> Response<Body> {
    received
        .lock()
        .expect("receiver state")
        .rejected
        .push(why.clone());
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(why)).boxed())
        .expect("static response")
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// Lowercase hex; "" for no bytes (or all zeros, as OTLP may send for
/// "no parent").
pub fn hex(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| *b == 0) {
        return String::new();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_length_prefixed() {
        let framed = grpc_frame(b"abc");
        assert_eq!(&framed[..], b"\0\0\0\0\x03abc");
        assert_eq!(grpc_message(&framed), Ok(&b"abc"[..]));
        assert_eq!(grpc_message(&grpc_frame(b"")), Ok(&b""[..]));
        assert!(grpc_message(b"\0\0\0").is_err());
        assert!(grpc_message(b"\x01\0\0\0\x03abc").is_err());
        assert!(grpc_message(b"\0\0\0\0\x04abc").is_err());
        assert!(grpc_message(b"\0\0\0\0\x02abc").is_err());
    }
}
