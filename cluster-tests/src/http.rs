//! A tiny HTTP/1.1 client over `tokio::net::TcpStream`: one request per
//! connection (`Connection: close`), bounded in time, with chunked and
//! content-length bodies. Enough for the admin API and HTTP publish.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound on one HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// A response: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response body is not JSON (status {}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// `GET path` on `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    request(addr, "GET", path, &[], b"").await
}

/// One request on a fresh connection; the whole exchange is bounded by
/// [`HTTP_TIMEOUT`].
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    tokio::time::timeout(
        HTTP_TIMEOUT,
        request_inner(addr, method, path, headers, body),
    )
    .await
    .map_err(|_| anyhow!("{method} {path} on {addr}: no response within {HTTP_TIMEOUT:?}"))?
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).await?;
    let mut raw = Vec::new();
    // A server may answer (e.g. 413) before reading the whole body and then
    // reset the connection; keep what arrived.
    let mut buf = [0u8; 16384];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if !raw.is_empty() => {
                let _ = e;
                break;
            }
            Err(e) => return Err(e).context("read response"),
        }
        if let Some(resp) = try_parse_complete(&raw)? {
            return Ok(resp);
        }
    }
    try_parse_complete(&raw)?
        .or_else(|| parse_until_eof(&raw).ok())
        .ok_or_else(|| anyhow!("incomplete response: {:?}", String::from_utf8_lossy(&raw)))
}

/// Splits the head off; `None` until `\r\n\r\n` has arrived.
fn split_head(raw: &[u8]) -> Option<(usize, &[u8])> {
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|pos| (pos + 4, &raw[..pos]))
}

/// Parses a status line and headers.
pub fn parse_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>)> {
    let text = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| {
            let (k, v) = line.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    Ok((status, headers))
}

fn try_parse_complete(raw: &[u8]) -> Result<Option<HttpResponse>> {
    let Some((body_start, head)) = split_head(raw) else {
        return Ok(None);
    };
    let (status, headers) = parse_head(head)?;
    let rest = &raw[body_start..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let body = if status == 101 || status == 204 || status == 304 {
        Some(Vec::new())
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().context("content-length")?;
        (rest.len() >= len).then(|| rest[..len].to_vec())
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        decode_chunked(rest)?
    } else {
        None
    };
    Ok(body.map(|body| HttpResponse {
        status,
        headers,
        body,
    }))
}

fn parse_until_eof(raw: &[u8]) -> Result<HttpResponse> {
    let (body_start, head) = split_head(raw).ok_or_else(|| anyhow!("no response head"))?;
    let (status, headers) = parse_head(head)?;
    Ok(HttpResponse {
        status,
        headers,
        body: raw[body_start..].to_vec(),
    })
}

/// Decodes a chunked body; `None` while incomplete.
fn decode_chunked(mut rest: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&rest[..eol])?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Sends a raw WebSocket upgrade request for `/ws` with these extra headers
/// and returns the status and headers of the answer (the connection is then
/// dropped). Lets tests see exactly what the server sends at the upgrade.
pub async fn raw_upgrade(
    addr: SocketAddr,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> Result<(u16, Vec<(String, String)>)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in extra_headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                bail!(
                    "connection closed before a full response head: {:?}",
                    String::from_utf8_lossy(&raw)
                );
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some((_, head)) = split_head(&raw) {
                return parse_head(head);
            }
        }
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("upgrade on {addr}: no response within {HTTP_TIMEOUT:?}"))?
}
