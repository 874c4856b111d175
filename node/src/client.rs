//! The client port: WebSocket sessions at `/ws` and the HTTP publish API.
//!
//! The upgrade is done by hand on hyper (negotiating the codec, checking the
//! token, applying admission control) so that one HTTP stack serves both,
//! and tokio-tungstenite only ever sees an upgraded connection.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use protocol::{Codec, Data, ErrorCode, Topic, TraceParent};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use crate::admission::Admission;
use crate::auth::{token_of, Auth, AuthError};
use crate::config::ClientConfig;
use crate::lifecycle::{Lifecycle, Phase};
use crate::metrics::{Rejection, METRICS};
use crate::outbox::close_code;
use crate::router::Router;
use crate::session;
use crate::shard::{Ack, Publish};

/// How long an HTTP publish waits for its owner to sequence the message.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// What every client connection shares.
pub struct ClientContext {
    pub limits: ClientConfig,
    pub router: Router,
    pub admission: Arc<Admission>,
    pub auth: Option<Auth>,
    pub lifecycle: Lifecycle,
    pub panic_topic: Option<String>,
    pub stall_topic: Option<String>,
    /// For log lines about sessions.
    pub node_id: crate::owner::NodeId,
}

impl ClientContext {
    fn websocket_config(&self) -> WebSocketConfig {
        // tungstenite's defaults (128 KiB buffers per connection, unbounded
        // write buffer, 64 MiB messages) do not fit many idle sessions.
        WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(0)
            .max_write_buffer_size(self.limits.outbound_queue_bytes.max(1 << 20) * 2)
            .max_message_size(Some(self.limits.max_message_bytes))
            .max_frame_size(Some(self.limits.max_message_bytes))
    }
}

type Body = Full<Bytes>;

/// Accepts client connections until the node starts draining.
pub async fn serve(listener: TcpListener, ctx: Arc<ClientContext>) {
    let draining = ctx.lifecycle.clone();
    let mut draining = std::pin::pin!(draining.draining());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve_connection(stream, ctx.clone()));
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of
                    // spinning on the error.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut draining => {
                info!("client listener closed: the node is draining");
                return;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, ctx: Arc<ClientContext>) {
    let _ = stream.set_nodelay(true);
    let timeout = ctx.limits.handshake_timeout;
    let service = service_fn(move |request| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(route(request, ctx).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        debug!(error = %e, "client connection ended with an error");
    }
}

async fn route(request: Request<Incoming>, ctx: Arc<ClientContext>) -> Response<Body> {
    let path = request.uri().path();
    if path == "/ws" {
        upgrade(request, ctx)
    } else if let Some(topic) = path.strip_prefix("/v1/publish/") {
        let topic = topic.to_owned();
        publish(request, topic, ctx).await
    } else {
        error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    }
}

pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("use {allow}"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn header_has_token(request: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    request
        .headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn upgrade(mut request: Request<Incoming>, ctx: Arc<ClientContext>) -> Response<Body> {
    if request.method() != Method::GET {
        return method_not_allowed("GET");
    }
    let key = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()));
    let is_upgrade = header_has_token(&request, header::UPGRADE, "websocket")
        && header_has_token(&request, header::CONNECTION, "upgrade")
        && request
            .headers()
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            == Some(b"13");
    let Some(accept) = key.filter(|_| is_upgrade) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected a WebSocket upgrade (version 13)",
        );
    };
    if ctx.lifecycle.phase() != Phase::Ready {
        METRICS.rejected(Rejection::Draining);
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the node is draining",
        );
    }
    let offers = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let Ok(negotiated) = Codec::negotiate(offers) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "no supported subprotocol offered (herald.v1.json, herald.v1.msgpack)",
        );
    };
    let grants = match &ctx.auth {
        None => None,
        Some(auth) => {
            match auth.verify(token_of(request.headers(), request.uri().query()).as_deref()) {
                Ok(grants) => Some(grants),
                Err(e) => return unauthorized(&e),
            }
        }
    };
    let admitted = ctx.admission.try_admit();

    let on_upgrade = hyper::upgrade::on(&mut request);
    let config = ctx.websocket_config();
    let codec = negotiated.unwrap_or(Codec::Json);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        match admitted {
            Ok(permit) => session::run(socket, ctx, codec, grants, permit).await,
            Err(why) => {
                debug!(reason = ?why, "connection refused by admission control");
                session::refuse(socket, close_code::TRY_AGAIN_LATER).await;
            }
        }
    });

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(codec) = negotiated {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(codec.subprotocol()),
        );
    }
    response
}

fn unauthorized(e: &AuthError) -> Response<Body> {
    debug!(error = %e, "request refused: unauthorized");
    let mut response = error_response(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized.as_str(),
        &e.to_string(),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn is_json_media_type(content_type: Option<&HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let media = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

async fn publish(
    request: Request<Incoming>,
    raw_topic: String,
    ctx: Arc<ClientContext>,
) -> Response<Body> {
    if request.method() != Method::POST {
        return method_not_allowed("POST");
    }
    let bad = |code: ErrorCode, message: &str| {
        error_response(StatusCode::BAD_REQUEST, code.as_str(), message)
    };
    let Some(text) = percent_decode(&raw_topic) else {
        return bad(
            ErrorCode::BadRequest,
            "the topic is not valid percent-encoded UTF-8",
        );
    };
    let topic = match Topic::parse(&text) {
        Ok(topic) => topic,
        Err(e) => return bad(e.code(), &e.to_string()),
    };
    if let Some(auth) = &ctx.auth {
        match auth.verify(token_of(request.headers(), request.uri().query()).as_deref()) {
            Ok(grants) if grants.may_publish(&topic) => {}
            Ok(_) => {
                return error_response(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden.as_str(),
                    &format!("the token does not allow publishing to {topic}"),
                )
            }
            Err(e) => return unauthorized(&e),
        }
    }
    let limit = ctx.limits.max_message_bytes;
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge.as_str(),
            &format!("the body is over the limit of {limit} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return too_large();
    }
    let json = is_json_media_type(request.headers().get(header::CONTENT_TYPE));
    let header_text = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let trace = header_text("traceparent").and_then(|t| TraceParent::parse(&t));
    let tracestate =
        header_text("tracestate").filter(|s| s.len() <= protocol::limits::MAX_TRACESTATE_BYTES);

    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(e) => return bad(ErrorCode::BadRequest, &format!("cannot read the body: {e}")),
    };
    let data = if json {
        match Data::from_json_text(&body) {
            Ok(data) => data,
            Err(e) => return bad(ErrorCode::BadRequest, &e.to_string()),
        }
    } else {
        Data::Binary(body)
    };

    METRICS.http_publishes.inc();
    let (ack, acked) = oneshot::channel();
    let (publish, _ingress) =
        Publish::from_client(topic, data, trace, tracestate, Some(Ack::Http(ack)));
    let unavailable = || {
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable.as_str(),
            "the topic's owner cannot be reached",
        )
    };
    if ctx.router.publish(publish).await.is_err() {
        return unavailable();
    }
    match tokio::time::timeout(PUBLISH_TIMEOUT, acked).await {
        Ok(Ok(Ok(acked))) => json_response(
            StatusCode::OK,
            &serde_json::json!({ "seq": acked.seq, "epoch": &*acked.epoch }),
        ),
        _ => unavailable(),
    }
}

/// Decodes `%XX` escapes; `None` for a bad escape or bytes that are not
/// UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            // Two hex digits exactly: `from_str_radix` alone would also take
            // a sign (`%+5`).
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a.b%3Ac"), Some("a.b:c".into()));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("a%+5"), None);
        assert_eq!(percent_decode("%-0"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn json_media_types() {
        let is = |v: &'static str| is_json_media_type(Some(&HeaderValue::from_static(v)));
        assert!(is("application/json"));
        assert!(is("Application/JSON; charset=utf-8"));
        assert!(is("application/vnd.api+json"));
        assert!(!is("text/plain"));
        assert!(!is_json_media_type(None));
    }
}
