//! WebSocket connections for the load generator.
//!
//! Every connection sets `TCP_NODELAY` (small frames otherwise wait for
//! delayed ACKs), bounds tungstenite's buffers, and is refused unless the URL
//! resolves to a loopback address: this tool only ever loads servers on this
//! machine.

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::Uri;
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
                .read_buffer_size(8 * 1024)
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
    let tcp = connect_loopback(url, request.uri()).await?;
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(profile.config()))
            .await
            .with_context(|| format!("WebSocket upgrade at {url}"))?;
    Ok(ws)
}

/// A TCP connection (with `TCP_NODELAY`) to the loopback address `uri` names.
async fn connect_loopback(url: &str, uri: &Uri) -> Result<TcpStream> {
    let host = uri
        .host()
        .context("URL without host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
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
    Ok(tcp)
}

/// What [`SubscriberWs::next`] read.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A complete text or binary message.
    Data(Bytes),
    /// The server closed the connection, with its close code if it sent one.
    Closed(Option<u16>),
}

/// A client WebSocket for the receiving side of the load generator.
///
/// Subscribers spend most of the generator's CPU, and tungstenite zeroes its
/// whole read buffer before every read (24% of the generator's CPU in a
/// `perf` profile at 200,000 deliveries/s). This one reads into spare
/// capacity without zeroing and hands out each message as a slice of the
/// read buffer. It answers pings and reassembles fragmented messages;
/// everything it sends is a masked frame, as RFC 6455 asks of a client.
pub struct SubscriberWs {
    tcp: TcpStream,
    buf: BytesMut,
    /// Bytes read ahead per `read` call.
    read_chunk: usize,
    /// Fragments of a message whose final frame has not come yet.
    partial: Vec<u8>,
    mask_state: u32,
}

/// Largest message a subscriber accepts.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

impl SubscriberWs {
    /// Connects to `url` (loopback only) and upgrades, offering
    /// `subprotocol` when given.
    pub async fn connect(
        url: &str,
        subprotocol: Option<&str>,
        profile: BufferProfile,
    ) -> Result<SubscriberWs> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("bad WebSocket URL {url}"))?;
        if uri.scheme_str() != Some("ws") {
            bail!("{url}: only ws:// URLs are supported");
        }
        let mut tcp = connect_loopback(url, &uri).await?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = uri.authority().map_or("localhost", |a| a.as_str());
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: {}\r\n",
            generate_key()
        );
        if let Some(proto) = subprotocol {
            request.push_str(&format!("Sec-WebSocket-Protocol: {proto}\r\n"));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes())
            .await
            .with_context(|| format!("WebSocket upgrade at {url}"))?;

        let read_chunk = match profile {
            BufferProfile::Throughput => 16 * 1024,
            BufferProfile::Idle => 1024,
        };
        let mut buf = BytesMut::with_capacity(read_chunk);
        let head_end = loop {
            if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break end + 4;
            }
            if buf.len() > 16 * 1024 {
                bail!("{url}: upgrade response headers too long");
            }
            buf.reserve(read_chunk);
            if tcp.read_buf(&mut buf).await? == 0 {
                bail!("{url}: connection closed during the WebSocket upgrade");
            }
        };
        let head = buf.split_to(head_end);
        let status_line = head[..].split(|b| *b == b'\r').next().unwrap_or_default();
        if !status_line.starts_with(b"HTTP/1.1 101") {
            bail!(
                "WebSocket upgrade at {url} refused: {}",
                String::from_utf8_lossy(status_line)
            );
        }
        Ok(SubscriberWs {
            tcp,
            buf,
            read_chunk,
            partial: Vec::new(),
            mask_state: 0x9e37_79b9 ^ std::process::id(),
        })
    }

    /// Sends one text (or, with `binary`, binary) message.
    pub async fn send(&mut self, payload: &[u8], binary: bool) -> Result<()> {
        let opcode = if binary { 0x2 } else { 0x1 };
        self.send_frame(opcode, payload).await
    }

    /// Reads the next complete message, answering pings on the way.
    pub async fn next(&mut self) -> Result<Incoming> {
        loop {
            while let Some(frame) = parse_frame(&mut self.buf)? {
                let Frame {
                    fin,
                    opcode,
                    payload,
                } = frame;
                match opcode {
                    0x0..=0x2 => {
                        if fin && self.partial.is_empty() {
                            return Ok(Incoming::Data(payload));
                        }
                        if self.partial.len() + payload.len() > MAX_MESSAGE_BYTES {
                            bail!("a fragmented message above {MAX_MESSAGE_BYTES} bytes");
                        }
                        self.partial.extend_from_slice(&payload);
                        if fin {
                            return Ok(Incoming::Data(std::mem::take(&mut self.partial).into()));
                        }
                    }
                    0x8 => {
                        let code = (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        // Echo the close, as the protocol asks; the server
                        // may already be gone.
                        let _ = self.send_frame(0x8, &payload[..payload.len().min(2)]).await;
                        return Ok(Incoming::Closed(code));
                    }
                    0x9 => self.send_frame(0xA, &payload).await?,
                    0xA => {}
                    other => bail!("unknown WebSocket opcode {other:#x}"),
                }
            }
            self.buf.reserve(self.read_chunk);
            match self.tcp.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(Incoming::Closed(None)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(Incoming::Closed(None))
                }
                Err(e) => return Err(e).context("reading from the WebSocket"),
            }
        }
    }

    /// Sends a close frame and waits (bounded by the caller) for the server's.
    pub async fn close(&mut self) {
        if self.send_frame(0x8, &1000u16.to_be_bytes()).await.is_err() {
            return;
        }
        while let Ok(Incoming::Data(_)) = self.next().await {}
    }

    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        // xorshift: masks need not be secret from a server we run ourselves.
        self.mask_state ^= self.mask_state << 13;
        self.mask_state ^= self.mask_state >> 17;
        self.mask_state ^= self.mask_state << 5;
        let mask = self.mask_state.to_be_bytes();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp
            .write_all(&frame)
            .await
            .context("writing to the WebSocket")
    }
}

/// One WebSocket frame, its payload unmasked.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Bytes,
}

/// Takes one complete frame off the front of `buf`; `None` until one is there.
fn parse_frame(buf: &mut BytesMut) -> Result<Option<Frame>> {
    let [b0, b1, ..] = buf[..] else {
        return Ok(None);
    };
    let masked = b1 & 0x80 != 0;
    let (len, mut header) = match b1 & 0x7f {
        126 => {
            let Some(bytes) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut len = [0; 8];
            len.copy_from_slice(bytes);
            (u64::from_be_bytes(len), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_MESSAGE_BYTES as u64 {
        bail!("a WebSocket frame of {len} bytes, above {MAX_MESSAGE_BYTES}");
    }
    let len = len as usize;
    let mut mask = None;
    if masked {
        let Some(key) = buf.get(header..header + 4) else {
            return Ok(None);
        };
        mask = Some([key[0], key[1], key[2], key[3]]);
        header += 4;
    }
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return Ok(None);
    }
    let _ = buf.split_to(header);
    let mut payload = buf.split_to(len);
    if let Some(mask) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Some(Frame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload: payload.freeze(),
    }))
}

/// A `Sec-WebSocket-Key`: 16 bytes in base64. The server we load is ours,
/// so the bytes need not be random, only well formed.
fn generate_key() -> String {
    use base64::Engine as _;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    base64::engine::general_purpose::STANDARD.encode(nanos.to_le_bytes())
}

/// Picks the URL for connection number `n` (round robin).
pub fn url_for(urls: &[String], n: usize) -> &str {
    &urls[n % urls.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;

    fn fragment(opcode: OpCode, fin: bool, payload: &'static [u8]) -> Message {
        let header = FrameHeader {
            is_final: fin,
            opcode,
            ..FrameHeader::default()
        };
        Message::Frame(Frame::from_payload(header, Bytes::from_static(payload)))
    }

    /// Against tungstenite's server: the subprotocol is offered, messages
    /// (whole, fragmented, large) arrive intact, a ping is answered and the
    /// close code is read.
    #[tokio::test]
    // The header callback's error type is tungstenite's, not ours.
    #[allow(clippy::result_large_err)]
    async fn talks_to_a_tungstenite_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let large = vec![7u8; 100_000];
        let expected_large = large.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut offered = None;
            let mut ws =
                tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, mut res: Response| {
                    offered = req.headers().get("Sec-WebSocket-Protocol").cloned();
                    if let Some(proto) = &offered {
                        res.headers_mut()
                            .insert("Sec-WebSocket-Protocol", proto.clone());
                    }
                    Ok(res)
                })
                .await
                .unwrap();
            let request = ws.next().await.unwrap().unwrap();
            ws.send(Message::text("hello")).await.unwrap();
            ws.send(fragment(OpCode::Data(Data::Binary), false, b"frag"))
                .await
                .unwrap();
            ws.send(fragment(OpCode::Data(Data::Continue), true, b"ment"))
                .await
                .unwrap();
            ws.send(Message::binary(large)).await.unwrap();
            ws.send(Message::Ping(Bytes::from_static(b"p1")))
                .await
                .unwrap();
            let pong = ws.next().await.unwrap().unwrap();
            ws.send(Message::Close(Some(CloseFrame {
                code: 4001.into(),
                reason: "slow".into(),
            })))
            .await
            .unwrap();
            (offered, request, pong)
        });

        let mut ws = SubscriberWs::connect(&url, Some("herald.v1.json"), BufferProfile::Idle)
            .await
            .unwrap();
        ws.send(br#"{"op":"sub"}"#, false).await.unwrap();
        assert_eq!(ws.next().await.unwrap(), Incoming::Data("hello".into()));
        assert_eq!(ws.next().await.unwrap(), Incoming::Data("fragment".into()));
        assert_eq!(
            ws.next().await.unwrap(),
            Incoming::Data(expected_large.into())
        );
        assert_eq!(ws.next().await.unwrap(), Incoming::Closed(Some(4001)));

        let (offered, request, pong) = server.await.unwrap();
        assert_eq!(offered.unwrap(), "herald.v1.json");
        assert_eq!(request, Message::text(r#"{"op":"sub"}"#));
        assert_eq!(pong, Message::Pong(Bytes::from_static(b"p1")));
    }

    #[tokio::test]
    async fn a_refused_upgrade_is_an_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = tcp.read(&mut request).await;
            tcp.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        let error = SubscriberWs::connect(&url, None, BufferProfile::Idle)
            .await
            .err()
            .unwrap();
        assert!(error.to_string().contains("400"), "{error:#}");
    }

    #[test]
    fn frames_wait_for_all_their_bytes() {
        let mut buf = BytesMut::from(&[0x82u8, 126, 0x01][..]);
        assert_eq!(parse_frame(&mut buf).unwrap(), None);
        buf.extend_from_slice(&[0x00]);
        buf.extend_from_slice(&[1u8; 255]);
        assert_eq!(parse_frame(&mut buf).unwrap(), None);
        buf.extend_from_slice(&[1u8, 0x81, 0x00]);
        let frame = parse_frame(&mut buf).unwrap().unwrap();
        assert_eq!(
            (frame.fin, frame.opcode, frame.payload.len()),
            (true, 2, 256)
        );
        let empty = parse_frame(&mut buf).unwrap().unwrap();
        assert_eq!((empty.opcode, empty.payload.len()), (1, 0));
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_frame_is_refused() {
        let mut buf = BytesMut::from(&[0x82u8, 127][..]);
        buf.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse_frame(&mut buf).is_err());
    }
}
