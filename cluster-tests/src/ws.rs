//! A WebSocket test client for `/ws` on tokio-tungstenite, speaking the json
//! or the msgpack codec.
//!
//! Every server message is handed to the test as a `serde_json::Value`
//! object, whatever the codec; a frame holding an array is split into its
//! elements. MessagePack `bin` values (which JSON cannot express) are shown
//! as `{"$bin": "<standard base64>"}`; build one with [`mp_bin`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The json subprotocol.
pub const JSON: &str = "herald.v1.json";
/// The msgpack subprotocol.
pub const MSGPACK: &str = "herald.v1.msgpack";

/// How long `recv` and the `expect_*` helpers wait by default.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection attempt (TCP and upgrade) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which codec a session speaks (from the subprotocol the server echoed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Msgpack,
}

/// `{"$bin": base64}`: how a msgpack `bin` value appears in a received
/// message (see the module doc).
pub fn mp_bin(bytes: &[u8]) -> Value {
    json!({ "$bin": base64::engine::general_purpose::STANDARD.encode(bytes) })
}

/// Standard base64 with padding, as json clients get binary data.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An upgrade the server refused with an HTTP status.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub body: String,
}

/// Options for one connection.
#[derive(Debug, Clone)]
pub struct WsConnect {
    addr: SocketAddr,
    path: String,
    subprotocols: Vec<String>,
    headers: Vec<(String, String)>,
    recv_buffer: Option<u32>,
}

impl WsConnect {
    pub fn new(addr: SocketAddr) -> WsConnect {
        WsConnect {
            addr,
            path: "/ws".to_owned(),
            subprotocols: Vec::new(),
            headers: Vec::new(),
            recv_buffer: None,
        }
    }

    /// Offers a subprotocol (in order of the calls).
    pub fn subprotocol(mut self, name: &str) -> Self {
        self.subprotocols.push(name.to_owned());
        self
    }

    /// Adds a header to the upgrade request.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// `Authorization: Bearer TOKEN`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("Authorization", &format!("Bearer {token}"))
    }

    /// `/ws?token=TOKEN`.
    pub fn token_query(mut self, token: &str) -> Self {
        self.path = format!("/ws?token={token}");
        self
    }

    /// Sets the path (and query) of the upgrade request.
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.to_owned();
        self
    }

    /// A small kernel receive buffer, so a client that stops reading backs
    /// the server up quickly (slow-consumer tests).
    pub fn recv_buffer(mut self, bytes: u32) -> Self {
        self.recv_buffer = Some(bytes);
        self
    }

    /// Connects; an upgrade refused with an HTTP status is an error.
    pub async fn connect(self) -> Result<WsClient> {
        match self.try_connect().await? {
            Ok(client) => Ok(client),
            Err(refusal) => bail!(
                "upgrade refused with HTTP {}: {}",
                refusal.status,
                refusal.body
            ),
        }
    }

    /// Connects; `Ok(Err(refusal))` when the server answered the upgrade
    /// with an HTTP status other than 101.
    pub async fn try_connect(self) -> Result<Result<WsClient, Refusal>> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.try_connect_inner())
            .await
            .map_err(|_| anyhow!("connect: no upgrade within {CONNECT_TIMEOUT:?}"))?
    }

    async fn try_connect_inner(self) -> Result<Result<WsClient, Refusal>> {
        let socket = TcpSocket::new_v4()?;
        if let Some(bytes) = self.recv_buffer {
            socket.set_recv_buffer_size(bytes)?;
        }
        let stream = socket
            .connect(self.addr)
            .await
            .with_context(|| format!("connect {}", self.addr))?;
        stream.set_nodelay(true)?;
        let mut request = format!("ws://{}{}", self.addr, self.path).into_client_request()?;
        if !self.subprotocols.is_empty() {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(&self.subprotocols.join(", "))?,
            );
        }
        for (name, value) in &self.headers {
            request.headers_mut().append(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
            Ok((ws, response)) => {
                let protocol = response
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .map(|v| v.to_str().unwrap_or_default().to_owned());
                let codec = match protocol.as_deref() {
                    Some(MSGPACK) => Codec::Msgpack,
                    _ => Codec::Json,
                };
                Ok(Ok(WsClient {
                    ws,
                    codec,
                    protocol,
                    pending: VecDeque::new(),
                    next_id: 1_000_000,
                    close: None,
                }))
            }
            Err(WsError::Http(response)) => Ok(Err(Refusal {
                status: response.status().as_u16(),
                body: response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            })),
            Err(e) => Err(e).context("websocket upgrade"),
        }
    }
}

/// What a session saw when the server ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code and reason.
    Close(u16, String),
    /// A close frame without a code.
    CloseNoCode,
    /// The TCP stream ended (or was reset) without a close frame.
    Eof(String),
}

/// One WebSocket session.
pub struct WsClient {
    ws: WebSocketStream<TcpStream>,
    codec: Codec,
    protocol: Option<String>,
    pending: VecDeque<Value>,
    next_id: u64,
    close: Option<Ended>,
}

impl WsClient {
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The subprotocol the server echoed, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// A fresh request id for helpers (well away from the ids tests pick).
    pub fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends a message (or an array of them) in this session's codec.
    pub async fn send_json(&mut self, value: Value) -> Result<()> {
        match self.codec {
            Codec::Json => self.send_raw_text(&value.to_string()).await,
            Codec::Msgpack => self.send_mp(&json_to_mp(&value)).await,
        }
    }

    /// Sends a MessagePack value as one binary frame.
    pub async fn send_mp(&mut self, value: &rmpv::Value) -> Result<()> {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, value)?;
        self.send_binary(&buf).await
    }

    /// Sends a text frame as is.
    pub async fn send_raw_text(&mut self, text: &str) -> Result<()> {
        self.send_frame(Message::text(text)).await
    }

    /// Sends a binary frame as is.
    pub async fn send_binary(&mut self, bytes: &[u8]) -> Result<()> {
        self.send_frame(Message::binary(bytes.to_vec())).await
    }

    async fn send_frame(&mut self, message: Message) -> Result<()> {
        tokio::time::timeout(RECV_TIMEOUT, self.ws.send(message))
            .await
            .map_err(|_| anyhow!("send: not written within {RECV_TIMEOUT:?}"))?
            .context("send")
    }

    /// Queues frames without flushing; [`WsClient::flush`] sends them.
    pub async fn feed_json(&mut self, value: Value) -> Result<()> {
        let message = match self.codec {
            Codec::Json => Message::text(value.to_string()),
            Codec::Msgpack => {
                let mut buf = Vec::new();
                rmpv::encode::write_value(&mut buf, &json_to_mp(&value))?;
                Message::binary(buf)
            }
        };
        tokio::time::timeout(RECV_TIMEOUT, self.ws.feed(message))
            .await
            .map_err(|_| anyhow!("feed: not written within {RECV_TIMEOUT:?}"))?
            .context("feed")
    }

    pub async fn flush(&mut self) -> Result<()> {
        tokio::time::timeout(RECV_TIMEOUT, self.ws.flush())
            .await
            .map_err(|_| anyhow!("flush: not written within {RECV_TIMEOUT:?}"))?
            .context("flush")
    }

    /// The next server message, waiting up to [`RECV_TIMEOUT`].
    pub async fn recv(&mut self) -> Result<Value> {
        self.recv_timeout(RECV_TIMEOUT).await
    }

    /// The next server message, waiting up to `timeout`. Control frames are
    /// skipped (tungstenite answers pings by itself while reading); a close
    /// frame or the end of the stream is an error (see [`WsClient::ended`]).
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Value> {
        self.read_until_pending(timeout).await?;
        self.pending
            .pop_front()
            .ok_or_else(|| anyhow!("no message within {timeout:?}"))
    }

    /// The objects of the next data frame, in order, waiting up to
    /// `timeout`: for tests of how the server batches. Messages already
    /// read past by a helper are an error, since their frames are unknown.
    pub async fn recv_frame(&mut self, timeout: Duration) -> Result<Vec<Value>> {
        ensure!(
            self.pending.is_empty(),
            "messages from earlier frames are still queued: {:?}",
            self.pending
        );
        self.read_until_pending(timeout).await?;
        Ok(self.pending.drain(..).collect())
    }

    /// Reads frames until a message is queued, for up to `timeout`.
    async fn read_until_pending(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.pending.is_empty() {
            if let Some(ended) = &self.close {
                bail!("session already ended: {ended:?}");
            }
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no message within {timeout:?}"))?;
            self.absorb(next)?;
        }
        Ok(())
    }

    /// Handles one item from the stream: queues messages, records an end.
    fn absorb(&mut self, next: Option<Result<Message, WsError>>) -> Result<()> {
        let message = match next {
            None => {
                self.close = Some(Ended::Eof("stream ended".to_owned()));
                bail!("connection ended without a close frame");
            }
            Some(Err(e)) => {
                let text = e.to_string();
                self.close = Some(Ended::Eof(text.clone()));
                bail!("connection failed: {text}");
            }
            Some(Ok(m)) => m,
        };
        match message {
            Message::Text(text) => {
                ensure!(
                    self.codec == Codec::Json,
                    "server sent a text frame on a msgpack session: {}",
                    text.as_str()
                );
                let value: Value = serde_json::from_str(text.as_str())
                    .with_context(|| format!("server frame is not JSON: {}", text.as_str()))?;
                self.queue_frame(value)
            }
            Message::Binary(bytes) => {
                ensure!(
                    self.codec == Codec::Msgpack,
                    "server sent a binary frame on a json session"
                );
                let value = rmpv::decode::read_value(&mut &bytes[..])
                    .context("server frame is not MessagePack")?;
                self.queue_frame(mp_to_json(&value)?)
            }
            Message::Close(frame) => {
                let ended = match frame {
                    Some(CloseFrame { code, reason }) => {
                        Ended::Close(u16::from(code), reason.as_str().to_owned())
                    }
                    None => Ended::CloseNoCode,
                };
                self.close = Some(ended.clone());
                bail!("server closed the session: {ended:?}");
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        }
    }

    fn queue_frame(&mut self, value: Value) -> Result<()> {
        match value {
            Value::Array(items) => {
                ensure!(!items.is_empty(), "server sent an empty array frame");
                for item in items {
                    ensure!(item.is_object(), "array element is not an object: {item}");
                    self.pending.push_back(item);
                }
            }
            Value::Object(_) => self.pending.push_back(value),
            other => bail!("server frame is neither an object nor an array: {other}"),
        }
        Ok(())
    }

    /// Puts messages back in front of the queue (in their order), for a
    /// helper that read past them while looking for something else.
    pub fn requeue(&mut self, messages: Vec<Value>) {
        for v in messages.into_iter().rev() {
            self.pending.push_front(v);
        }
    }

    /// How the session ended, once it has.
    pub fn ended(&self) -> Option<&Ended> {
        self.close.as_ref()
    }

    /// Receives `n` messages (each within the default timeout).
    pub async fn recv_n(&mut self, n: usize) -> Result<Vec<Value>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(
                self.recv()
                    .await
                    .with_context(|| format!("message {} of {n}", i + 1))?,
            );
        }
        Ok(out)
    }

    /// Receives messages until none arrives for `quiet`, for at most `limit`.
    pub async fn drain(&mut self, quiet: Duration, limit: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match self.recv_timeout(quiet).await {
                Ok(v) => out.push(v),
                Err(_) if self.close.is_none() => return Ok(out),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The next message must be `ok` with this id; returns it.
    pub async fn expect_ok(&mut self, id: u64) -> Result<Value> {
        let v = self.recv().await.context("waiting for ok")?;
        ensure!(
            v["op"] == "ok" && v["id"] == json!(id),
            "expected ok with id {id}, got {v}"
        );
        Ok(v)
    }

    /// The next message must be `pong` with this id.
    pub async fn expect_pong(&mut self, id: u64) -> Result<()> {
        let v = self.recv().await.context("waiting for pong")?;
        ensure!(
            v["op"] == "pong" && v["id"] == json!(id),
            "expected pong with id {id}, got {v}"
        );
        ensure!(
            v.as_object().is_some_and(|o| o.len() == 2),
            "pong has extra fields: {v}"
        );
        Ok(())
    }

    /// The next message must be `err` with this id (`None` for null) and
    /// code, and a string `message`; returns it.
    pub async fn expect_err(&mut self, id: Option<u64>, code: &str) -> Result<Value> {
        let v = self.recv().await.context("waiting for err")?;
        check_err(&v, id, code)?;
        Ok(v)
    }

    /// The next message must be a `msg` on `topic` with this data; returns
    /// it (for its `seq` and trace fields).
    pub async fn expect_msg(&mut self, topic: &str, data: &Value) -> Result<Value> {
        let v = self.recv().await.context("waiting for msg")?;
        ensure!(
            v["op"] == "msg" && v["topic"] == topic && &v["data"] == data,
            "expected msg on {topic} with data {data}, got {v}"
        );
        ensure!(v["seq"].is_u64(), "msg without a u64 seq: {v}");
        Ok(v)
    }

    /// Nothing (no message, no close) may arrive for `duration`.
    pub async fn expect_nothing(&mut self, duration: Duration) -> Result<()> {
        if let Some(v) = self.pending.pop_front() {
            bail!("expected nothing, got {v}");
        }
        let deadline = tokio::time::Instant::now() + duration;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(()),
                Ok(next) => {
                    // A control frame is fine; anything else is not.
                    self.absorb(next)?;
                    if let Some(v) = self.pending.pop_front() {
                        bail!("expected nothing, got {v}");
                    }
                }
            }
        }
    }

    /// Reads (discarding messages) until the server closes the session;
    /// the close frame must carry `code`. Returns how many messages were
    /// discarded on the way.
    pub async fn expect_close(&mut self, code: u16, timeout: Duration) -> Result<usize> {
        let ended = self.wait_end(timeout).await?;
        match &ended.0 {
            Ended::Close(c, _) if *c == code => Ok(ended.1),
            other => bail!("expected close code {code}, session ended with {other:?}"),
        }
    }

    /// Reads (discarding messages) until the session ends in any way;
    /// returns how it ended and how many messages were discarded.
    pub async fn wait_end(&mut self, timeout: Duration) -> Result<(Ended, usize)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut discarded = self.pending.len();
        self.pending.clear();
        loop {
            if let Some(ended) = &self.close {
                return Ok((ended.clone(), discarded));
            }
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| {
                    anyhow!("session still open after {timeout:?} ({discarded} messages read)")
                })?;
            let _ = self.absorb(next);
            discarded += self.pending.len();
            self.pending.clear();
        }
    }

    /// Sends `ping` with a fresh id and expects the `pong` next: the session
    /// is alive and in step.
    pub async fn assert_alive(&mut self) -> Result<()> {
        let id = self.fresh_id();
        self.send_json(json!({"op": "ping", "id": id})).await?;
        self.expect_pong(id).await.context("session is not alive")
    }

    /// `sub` and its `ok`; returns the `ok`.
    pub async fn sub(&mut self, topic: &str) -> Result<Value> {
        let id = self.fresh_id();
        self.send_json(json!({"op": "sub", "id": id, "topic": topic}))
            .await?;
        self.expect_ok(id).await
    }

    /// `sub` with a group, and its `ok`.
    pub async fn sub_group(&mut self, topic: &str, group: &str) -> Result<Value> {
        let id = self.fresh_id();
        self.send_json(json!({"op": "sub", "id": id, "topic": topic, "group": group}))
            .await?;
        self.expect_ok(id).await
    }

    /// `unsub` and its `ok`.
    pub async fn unsub(&mut self, topic: &str) -> Result<Value> {
        let id = self.fresh_id();
        self.send_json(json!({"op": "unsub", "id": id, "topic": topic}))
            .await?;
        self.expect_ok(id).await
    }

    /// `pub` with an id; waits for its `ok` (the next message must be it)
    /// and returns `(seq, epoch)`.
    pub async fn publish(&mut self, topic: &str, data: Value) -> Result<(u64, String)> {
        let id = self.fresh_id();
        self.send_json(json!({"op": "pub", "id": id, "topic": topic, "data": data}))
            .await?;
        let ok = self.expect_ok(id).await?;
        seq_epoch(&ok)
    }

    /// `pub` without an id (no reply expected).
    pub async fn publish_unacked(&mut self, topic: &str, data: Value) -> Result<()> {
        self.send_json(json!({"op": "pub", "topic": topic, "data": data}))
            .await
    }

    /// Starts the closing handshake and waits (bounded) for the server's
    /// answer, so nothing is lost to a reset.
    pub async fn close(mut self) -> Result<()> {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = tokio::time::timeout(RECV_TIMEOUT, self.ws.close(Some(frame))).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.ws.next()).await {}
        Ok(())
    }
}

/// Checks that `v` is an `err` with this id (`None`: null) and code, with a
/// string `message`.
pub fn check_err(v: &Value, id: Option<u64>, code: &str) -> Result<()> {
    let want_id = id.map_or(Value::Null, |id| json!(id));
    ensure!(
        v["op"] == "err" && v["code"] == code,
        "expected err {code} (id {want_id}), got {v}"
    );
    ensure!(
        v.get("id") == Some(&want_id),
        "expected err id {want_id}, got {v}"
    );
    ensure!(v["message"].is_string(), "err without a message: {v}");
    Ok(())
}

/// `(seq, epoch)` from an `ok`, both required.
pub fn seq_epoch(ok: &Value) -> Result<(u64, String)> {
    let seq = ok["seq"]
        .as_u64()
        .ok_or_else(|| anyhow!("ok without a u64 seq: {ok}"))?;
    let epoch = ok["epoch"]
        .as_str()
        .ok_or_else(|| anyhow!("ok without a string epoch: {ok}"))?;
    Ok((seq, epoch.to_owned()))
}

/// JSON to MessagePack: objects become maps with string keys.
pub fn json_to_mp(value: &Value) -> rmpv::Value {
    match value {
        Value::Null => rmpv::Value::Nil,
        Value::Bool(b) => rmpv::Value::Boolean(*b),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                rmpv::Value::from(u)
            } else if let Some(i) = n.as_i64() {
                rmpv::Value::from(i)
            } else {
                rmpv::Value::F64(n.as_f64().unwrap_or_default())
            }
        }
        Value::String(s) => rmpv::Value::from(s.as_str()),
        Value::Array(items) => rmpv::Value::Array(items.iter().map(json_to_mp).collect()),
        Value::Object(map) => rmpv::Value::Map(
            map.iter()
                .map(|(k, v)| (rmpv::Value::from(k.as_str()), json_to_mp(v)))
                .collect(),
        ),
    }
}

/// MessagePack to JSON; `bin` becomes `{"$bin": base64}`, map keys must be
/// strings.
pub fn mp_to_json(value: &rmpv::Value) -> Result<Value> {
    Ok(match value {
        rmpv::Value::Nil => Value::Null,
        rmpv::Value::Boolean(b) => Value::Bool(*b),
        rmpv::Value::Integer(i) => {
            if let Some(u) = i.as_u64() {
                json!(u)
            } else {
                json!(i.as_i64().ok_or_else(|| anyhow!("integer out of range"))?)
            }
        }
        rmpv::Value::F32(f) => json!(f),
        rmpv::Value::F64(f) => json!(f),
        rmpv::Value::String(s) => Value::String(
            s.as_str()
                .ok_or_else(|| anyhow!("msgpack str is not UTF-8"))?
                .to_owned(),
        ),
        rmpv::Value::Binary(b) => mp_bin(b),
        rmpv::Value::Array(items) => {
            Value::Array(items.iter().map(mp_to_json).collect::<Result<_>>()?)
        }
        rmpv::Value::Map(entries) => {
            let mut map = serde_json::Map::new();
            for (k, v) in entries {
                let key = k
                    .as_str()
                    .ok_or_else(|| anyhow!("msgpack map key is not a string: {k}"))?;
                map.insert(key.to_owned(), mp_to_json(v)?);
            }
            Value::Object(map)
        }
        rmpv::Value::Ext(t, _) => bail!("unexpected msgpack ext type {t}"),
    })
}
