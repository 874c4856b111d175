//! The admin port: metrics, liveness, readiness and the cluster view.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::admission::Admission;
use crate::client::{error_response, json_response};
use crate::cluster::ClusterView;
use crate::lifecycle::{Lifecycle, Phase};
use crate::load::{MemoryLimit, SchedulingLag};
use crate::metrics;
use crate::owner::NodeId;
use crate::router::Router;

/// How long every shard has to answer the liveness check.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// One member as `/v1/cluster` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub node_id: String,
    pub state: &'static str,
    pub client_addr: String,
    pub admin_addr: String,
    pub cluster_addr: String,
    pub generation: u64,
}

pub struct AdminContext {
    pub node_id: NodeId,
    pub generation: u64,
    pub client_addr: String,
    pub admin_addr: String,
    pub cluster_addr: String,
    pub vnodes: usize,
    pub lifecycle: Lifecycle,
    pub admission: Arc<Admission>,
    pub router: Router,
    /// `None` for a single node.
    pub cluster: Option<watch::Receiver<Arc<ClusterView>>>,
    pub lag: Arc<SchedulingLag>,
    pub max_lag: Duration,
    pub memory: MemoryLimit,
    pub max_memory_fraction: f64,
}

impl AdminContext {
    /// Why the node should not get new clients now; empty when it should.
    pub fn unready_reasons(&self) -> Vec<&'static str> {
        let mut reasons = Vec::new();
        if let Some(cluster) = &self.cluster {
            if !cluster.borrow().joined() {
                reasons.push("joining");
            }
        }
        if self.lifecycle.phase() != Phase::Ready {
            reasons.push("draining");
        }
        if self.admission.overloaded() {
            reasons.push("overloaded");
        }
        if self.lag.get() >= self.max_lag {
            reasons.push("scheduling_lag");
        }
        if self
            .memory
            .read()
            .is_some_and(|m| m.fraction() >= self.max_memory_fraction)
        {
            reasons.push("memory");
        }
        reasons
    }

    fn state(&self) -> &'static str {
        match self.lifecycle.phase() {
            Phase::Ready => "ready",
            Phase::Draining | Phase::Closing => "draining",
        }
    }
}

pub async fn serve(listener: TcpListener, ctx: Arc<AdminContext>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(route(request, &ctx).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

async fn route(request: Request<Incoming>, ctx: &AdminContext) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz" | "/v1/cluster");
    if !known {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    match path {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics::render_all())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => {
            if ctx.router.healthy(HEALTH_TIMEOUT).await {
                json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
            } else {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({ "status": "stalled", "message": "a topic shard did not answer" }),
                )
            }
        }
        "/readyz" => {
            let reasons = ctx.unready_reasons();
            let status = if reasons.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(
                status,
                &serde_json::json!({ "ready": reasons.is_empty(), "reasons": reasons }),
            )
        }
        _ => cluster_view(ctx),
    }
}

fn cluster_view(ctx: &AdminContext) -> Response<Full<Bytes>> {
    let Some(cluster) = &ctx.cluster else {
        let me = MemberView {
            node_id: ctx.node_id.to_string(),
            state: ctx.state(),
            client_addr: ctx.client_addr.clone(),
            admin_addr: ctx.admin_addr.clone(),
            cluster_addr: ctx.cluster_addr.clone(),
            generation: ctx.generation,
        };
        // A single node owns the whole ring.
        let owners: BTreeMap<String, f64> = [(me.node_id.clone(), 1.0)].into_iter().collect();
        return json_response(
            StatusCode::OK,
            &serde_json::json!({
                "node_id": &*ctx.node_id,
                "members": [me],
                "ring": { "vnodes": ctx.vnodes, "owners": owners },
            }),
        );
    };
    let view = cluster.borrow().clone();
    let members: Vec<MemberView> = view
        .members
        .iter()
        .map(|m| MemberView {
            node_id: m.node.to_string(),
            // This node's own state is known first-hand.
            state: if m.is_self {
                view.state.as_str()
            } else {
                m.state.as_str()
            },
            client_addr: m.client_addr.clone(),
            admin_addr: m.admin_addr.clone(),
            cluster_addr: m.cluster_addr.clone(),
            generation: m.generation,
        })
        .collect();
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "node_id": &*ctx.node_id,
            "members": members,
            "ring": {
                "vnodes": ctx.vnodes,
                "version": view.placement.version,
                "owners": view.placement.shares(),
            },
        }),
    )
}
