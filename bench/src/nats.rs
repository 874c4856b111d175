//! The NATS client protocol over WebSocket, for comparison runs.
//!
//! The WebSocket carries the plain NATS text protocol as a byte stream: one
//! frame may hold several operations and an operation may span frames, so
//! [`NatsParser`] buffers bytes and yields whole operations. Subscriptions are
//! known to be registered when the `PONG` to a `PING` sent after the `SUB`
//! arrives (the server handles a connection's operations in order).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Buf, BytesMut};
use memchr::memmem;

use crate::payload;
use crate::session::{Delivery, FrameOutcome, SubscriberConn};
use crate::ws::{BufferProfile, Incoming, SubscriberWs};

const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `CONNECT` line sent first on every connection.
pub const CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n";
/// A `PING`.
pub const PING: &[u8] = b"PING\r\n";
/// A `PONG`.
pub const PONG: &[u8] = b"PONG\r\n";

/// One operation from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsEvent {
    /// A `MSG`, with the benchmark payload's `(index, sent_ns)` if readable.
    Msg {
        payload: Option<(u64, u64)>,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
    Info,
}

/// Splits the server's byte stream into operations.
#[derive(Debug, Default)]
pub struct NatsParser {
    buf: BytesMut,
}

impl NatsParser {
    /// Adds bytes received from the server.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete operation, if the buffer holds one.
    pub fn next_event(&mut self) -> Result<Option<NatsEvent>> {
        let Some(line_end) = memmem::find(&self.buf, b"\r\n") else {
            if self.buf.len() > 64 * 1024 {
                bail!("NATS control line longer than 64 KiB");
            }
            return Ok(None);
        };
        let line = &self.buf[..line_end];
        if let Some(args) = line.strip_prefix(b"MSG ") {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let size_token = args
                .rsplit(|b| *b == b' ')
                .find(|t| !t.is_empty())
                .context("MSG without size")?;
            let (size, rest) = payload::take_decimal(size_token).context("bad MSG size")?;
            if !rest.is_empty() {
                bail!("bad MSG size {:?}", String::from_utf8_lossy(size_token));
            }
            let size = size as usize;
            let start = line_end + 2;
            let total = start + size + 2;
            if self.buf.len() < total {
                return Ok(None);
            }
            let decoded = payload::decode(&self.buf[start..start + size]);
            if &self.buf[start + size..total] != b"\r\n" {
                bail!("MSG payload not followed by CRLF");
            }
            self.buf.advance(total);
            return Ok(Some(NatsEvent::Msg { payload: decoded }));
        }
        let event = if line == b"PING" {
            NatsEvent::Ping
        } else if line == b"PONG" {
            NatsEvent::Pong
        } else if line == b"+OK" {
            NatsEvent::Ok
        } else if line.starts_with(b"-ERR") {
            NatsEvent::Err(String::from_utf8_lossy(line).into_owned())
        } else if line.starts_with(b"INFO") {
            NatsEvent::Info
        } else {
            bail!("unknown NATS operation {:?}", String::from_utf8_lossy(line));
        };
        self.buf.advance(line_end + 2);
        Ok(Some(event))
    }
}

/// Encodes `PUB subject n\r\npayload\r\n` into `out`.
pub fn encode_pub(subject: &str, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// The connection ended, with the close code if the server sent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed(pub Option<u16>);

/// Reads one frame from a NATS WebSocket and appends its complete operations
/// to `events`; `Ok(Some(Closed))` when the connection ended.
async fn read_events(
    ws: &mut SubscriberWs,
    parser: &mut NatsParser,
    events: &mut Vec<NatsEvent>,
) -> Result<Option<Closed>> {
    match ws.next().await.context("reading from nats")? {
        Incoming::Data(bytes) => parser.feed(&bytes),
        Incoming::Closed(code) => return Ok(Some(Closed(code))),
    }
    while let Some(event) = parser.next_event()? {
        events.push(event);
    }
    Ok(None)
}

/// A NATS connection subscribed to one subject.
pub struct NatsSubscriber {
    ws: SubscriberWs,
    parser: NatsParser,
    events: Vec<NatsEvent>,
}

impl NatsSubscriber {
    /// Connects, sends `CONNECT`, `SUB subject 1` and `PING`, and waits for the `PONG`.
    pub async fn open(url: &str, subject: &str, profile: BufferProfile) -> Result<Self> {
        let ws = SubscriberWs::connect(url, None, profile).await?;
        let mut sub = NatsSubscriber {
            ws,
            parser: NatsParser::default(),
            events: Vec::new(),
        };
        let mut hello = CONNECT.to_vec();
        hello.extend_from_slice(format!("SUB {subject} 1\r\n").as_bytes());
        hello.extend_from_slice(PING);
        sub.ws
            .send(&hello, true)
            .await
            .context("sending CONNECT/SUB")?;
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
            loop {
                if let Some(Closed(code)) =
                    read_events(&mut sub.ws, &mut sub.parser, &mut sub.events).await?
                {
                    bail!("closed before the subscription was confirmed (code {code:?})");
                }
                for event in sub.events.drain(..) {
                    match event {
                        NatsEvent::Pong => return Ok(()),
                        NatsEvent::Err(e) => bail!("SUB refused: {e}"),
                        _ => {}
                    }
                }
            }
        })
        .await
        .context("timed out waiting for PONG after SUB")??;
        Ok(sub)
    }
}

impl SubscriberConn for NatsSubscriber {
    fn subscribed_at_seq(&self) -> Option<u64> {
        None
    }

    async fn next_frame(&mut self, out: &mut Vec<Delivery>) -> Result<FrameOutcome> {
        self.events.clear();
        if let Some(Closed(code)) =
            read_events(&mut self.ws, &mut self.parser, &mut self.events).await?
        {
            return Ok(FrameOutcome::Closed { code });
        }
        let mut server_errors = 0;
        let mut pings = 0;
        for event in self.events.drain(..) {
            match event {
                NatsEvent::Msg { payload } => out.push(Delivery { payload, seq: None }),
                NatsEvent::Ping => pings += 1,
                NatsEvent::Err(_) => server_errors += 1,
                NatsEvent::Pong | NatsEvent::Ok | NatsEvent::Info => {}
            }
        }
        for _ in 0..pings {
            self.ws.send(PONG, true).await.context("answering PING")?;
        }
        Ok(FrameOutcome::Data { server_errors })
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_operations() {
        let mut parser = NatsParser::default();
        let mut payload = Vec::new();
        payload::encode(5, 900, 16, &mut payload);
        let mut stream = b"INFO {\"x\":1}\r\nPING\r\n".to_vec();
        stream.extend_from_slice(format!("MSG a.b 1 {}\r\n", payload.len()).as_bytes());
        stream.extend_from_slice(&payload);
        stream.extend_from_slice(b"\r\nMSG a.b 1 reply.to 0\r\n\r\nPONG\r\n");
        let mut events = Vec::new();
        // Feed one byte at a time: every split point must work.
        for byte in &stream {
            parser.feed(std::slice::from_ref(byte));
            while let Some(event) = parser.next_event().expect("parse") {
                events.push(event);
            }
        }
        assert_eq!(
            events,
            vec![
                NatsEvent::Info,
                NatsEvent::Ping,
                NatsEvent::Msg {
                    payload: Some((5, 900))
                },
                NatsEvent::Msg { payload: None },
                NatsEvent::Pong,
            ]
        );
    }

    #[test]
    fn encodes_pub() {
        let mut out = Vec::new();
        encode_pub("s", b"hey", &mut out);
        assert_eq!(out, b"PUB s 3\r\nhey\r\n");
    }
}
