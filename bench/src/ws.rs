//! WebSocket connections for the load generator.
//!
//! Every connection sets `TCP_NODELAY` (small frames otherwise wait for
//! delayed ACKs), bounds tungstenite's buffers, and is refused unless the URL
//! resolves to a loopback address: this tool only ever loads servers on this
//! machine.

use anyhow::{bail, Context, Result};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// How much buffer memory a connection may use.
#[derive(Debug, Clone, Copy)]
pub enum BufferProfile {
    /// Publishers and fan-out subscribers: large reads, batched writes.
    Throughput,
    /// Many idle connections: small buffers, eager writes.
    Idle,
}

impl BufferProfile {
    fn config(self) -> WebSocketConfig {
        let base = WebSocketConfig::default()
            .max_message_size(Some(4 << 20))
            .max_frame_size(Some(4 << 20));
        match self {
            BufferProfile::Throughput => base
                .read_buffer_size(64 * 1024)
                .write_buffer_size(64 * 1024)
                .max_write_buffer_size(16 << 20),
            BufferProfile::Idle => base
                .read_buffer_size(4 * 1024)
                .write_buffer_size(0)
                .max_write_buffer_size(1 << 20),
        }
    }
}

/// Opens a WebSocket to `url`, offering `subprotocol` when given.
pub async fn connect(url: &str, subprotocol: Option<&str>, profile: BufferProfile) -> Result<Ws> {
    let mut request = url
        .into_client_request()
        .with_context(|| format!("bad WebSocket URL {url}"))?;
    if let Some(proto) = subprotocol {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(proto).context("bad subprotocol")?,
        );
    }
    let host = request
        .uri()
        .host()
        .context("URL without host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = request.uri().port_u16().unwrap_or(80);
    let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .collect();
    let Some(addr) = addrs.iter().find(|a| a.ip().is_loopback()).copied() else {
        bail!("{url}: only loopback addresses may be loaded by this tool");
    };
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(profile.config()))
            .await
            .with_context(|| format!("WebSocket upgrade at {url}"))?;
    Ok(ws)
}

/// Picks the URL for connection number `n` (round robin).
pub fn url_for(urls: &[String], n: usize) -> &str {
    &urls[n % urls.len()]
}
