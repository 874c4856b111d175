//! A minimal OTLP/HTTP trace receiver, as a collector would be: `POST
//! /v1/traces` with an `ExportTraceServiceRequest` in protobuf, answered
//! 200 with an empty `ExportTraceServiceResponse`. Every span received is
//! kept, flattened with its resource's `service.name` and
//! `service.instance.id`, for tests to look at.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tokio::net::TcpListener;

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
    /// Binds 127.0.0.1:0 and starts serving (on the current runtime).
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
                let received = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let received = received.clone();
                        async move { Ok::<_, Infallible>(handle(req, &received).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(OtlpReceiver {
            addr,
            received,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
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
                "  {} trace={} span={} parent={} kind={:?} node={} attrs={:?}",
                s.name,
                s.trace_id,
                s.span_id,
                s.parent_span_id,
                s.kind,
                s.instance_id().unwrap_or("?"),
                s.attributes
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn handle(req: Request<Incoming>, received: &Mutex<Received>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return refuse(received, StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    received.lock().expect("receiver state").requests += 1;
    if parts.method != Method::POST || parts.uri.path() != "/v1/traces" {
        return refuse(
            received,
            StatusCode::NOT_FOUND,
            format!("{} {}", parts.method, parts.uri),
        );
    }
    let content_type = parts
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
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
                });
            }
        }
    }
    received.lock().expect("receiver state").spans.extend(spans);
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(
            ExportTraceServiceResponse::default().encode_to_vec(),
        )))
        .expect("static response")
}

fn refuse(received: &Mutex<Received>, status: StatusCode, why: String) -> Response<Full<Bytes>> {
    received
        .lock()
        .expect("receiver state")
        .rejected
        .push(why.clone());
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(why)))
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
