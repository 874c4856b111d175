//! Herald's client protocol: encoding `sub`/`pub`, reading `msg`/`ok`/`err`.
//!
//! A frame holds one object or an array of objects, in JSON (text frames) or
//! MessagePack (binary frames). Subscribers read `msg` frames in the hot
//! path: in [`ParseMode::Scan`] a JSON frame is read by locating `"seq":` and
//! `"data":"` with `memchr` instead of building a document, which is only
//! done for frames that are not plain `msg` objects.

use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use memchr::memmem::Finder;
use rmpv::ValueRef;
use tokio_tungstenite::tungstenite::Message;

use crate::payload;
use crate::session::{Codec, Delivery, FrameOutcome, ParseMode, SubscriberConn};
use crate::ws::{BufferProfile, Incoming, SubscriberWs};

/// How long a subscription may take to be confirmed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a clean close may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `Sec-WebSocket-Protocol` value for a codec.
pub fn subprotocol(codec: Codec) -> &'static str {
    match codec {
        Codec::Json => "herald.v1.json",
        Codec::Msgpack => "herald.v1.msgpack",
    }
}

/// A reply from the server (anything that is not a `msg`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok {
        id: Option<u64>,
        seq: Option<u64>,
    },
    Err {
        id: Option<u64>,
        code: String,
        message: String,
    },
    Pong,
    Other(String),
}

/// Encodes a `sub` request.
pub fn encode_sub(codec: Codec, id: u64, topic: &str) -> Message {
    match codec {
        Codec::Json => Message::text(format!(r#"{{"op":"sub","id":{id},"topic":"{topic}"}}"#)),
        Codec::Msgpack => {
            let mut buf = Vec::with_capacity(32 + topic.len());
            write_map(&mut buf, 3);
            write_str(&mut buf, "op");
            write_str(&mut buf, "sub");
            write_str(&mut buf, "id");
            write_uint(&mut buf, id);
            write_str(&mut buf, "topic");
            write_str(&mut buf, topic);
            Message::binary(buf)
        }
    }
}

/// Encodes a `ping` request.
pub fn encode_ping(codec: Codec, id: u64) -> Message {
    match codec {
        Codec::Json => Message::text(format!(r#"{{"op":"ping","id":{id}}}"#)),
        Codec::Msgpack => {
            let mut buf = Vec::with_capacity(24);
            write_map(&mut buf, 2);
            write_str(&mut buf, "op");
            write_str(&mut buf, "ping");
            write_str(&mut buf, "id");
            write_uint(&mut buf, id);
            Message::binary(buf)
        }
    }
}

/// Builds `pub` frames carrying benchmark payloads.
pub struct PubEncoder {
    codec: Codec,
    topic: String,
    payload_bytes: usize,
    payload: Vec<u8>,
}

impl PubEncoder {
    pub fn new(codec: Codec, topic: &str, payload_bytes: usize) -> Self {
        PubEncoder {
            codec,
            topic: topic.to_string(),
            payload_bytes,
            payload: Vec::with_capacity(payload_bytes + 64),
        }
    }

    /// The `pub` frame for message `index`, acknowledged with `id` if any.
    pub fn encode(&mut self, id: Option<u64>, index: u64, sent_ns: u64) -> Message {
        self.payload.clear();
        payload::encode(index, sent_ns, self.payload_bytes, &mut self.payload);
        let mut buf = Vec::with_capacity(self.payload.len() + self.topic.len() + 48);
        match self.codec {
            Codec::Json => {
                buf.extend_from_slice(br#"{"op":"pub","#);
                if let Some(id) = id {
                    buf.extend_from_slice(br#""id":"#);
                    buf.extend_from_slice(id.to_string().as_bytes());
                    buf.push(b',');
                }
                buf.extend_from_slice(br#""topic":""#);
                buf.extend_from_slice(self.topic.as_bytes());
                buf.extend_from_slice(br#"","data":""#);
                buf.extend_from_slice(&self.payload);
                buf.extend_from_slice(br#""}"#);
                // The payload and topic are ASCII, so this cannot fail.
                match String::from_utf8(buf) {
                    Ok(text) => Message::text(text),
                    Err(e) => Message::binary(e.into_bytes()),
                }
            }
            Codec::Msgpack => {
                write_map(&mut buf, 3 + u32::from(id.is_some()));
                write_str(&mut buf, "op");
                write_str(&mut buf, "pub");
                if let Some(id) = id {
                    write_str(&mut buf, "id");
                    write_uint(&mut buf, id);
                }
                write_str(&mut buf, "topic");
                write_str(&mut buf, &self.topic);
                write_str(&mut buf, "data");
                // ASCII payload as a msgpack str.
                let _ = rmp::encode::write_str_len(&mut buf, self.payload.len() as u32);
                buf.extend_from_slice(&self.payload);
                Message::binary(buf)
            }
        }
    }
}

fn write_map(buf: &mut Vec<u8>, len: u32) {
    // Writing to a Vec cannot fail.
    let _ = rmp::encode::write_map_len(buf, len);
}

fn write_str(buf: &mut Vec<u8>, s: &str) {
    let _ = rmp::encode::write_str(buf, s);
}

fn write_uint(buf: &mut Vec<u8>, v: u64) {
    let _ = rmp::encode::write_uint(buf, v);
}

static OP_MSG: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""op":"msg""#));
static SEQ_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""seq":"#));
static DATA_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""data":""#));

/// Reads server frames.
#[derive(Debug, Clone, Copy)]
pub struct FrameParser {
    pub codec: Codec,
    pub mode: ParseMode,
}

impl FrameParser {
    /// Appends the frame's deliveries to `deliveries` and its other replies to `replies`.
    pub fn parse(
        &self,
        frame: &[u8],
        deliveries: &mut Vec<Delivery>,
        replies: &mut Vec<Reply>,
    ) -> Result<()> {
        match (self.codec, self.mode) {
            (Codec::Json, ParseMode::Scan) => {
                let before = deliveries.len();
                if scan_json_msgs(frame, deliveries) {
                    return Ok(());
                }
                deliveries.truncate(before);
                parse_json_full(frame, deliveries, replies)
            }
            (Codec::Json, ParseMode::Full) => parse_json_full(frame, deliveries, replies),
            (Codec::Msgpack, _) => parse_msgpack(frame, deliveries, replies),
        }
    }
}

/// The fast path: a frame of `msg` objects only. Returns false (maybe after
/// appending some deliveries) when the frame is anything else.
fn scan_json_msgs(frame: &[u8], deliveries: &mut Vec<Delivery>) -> bool {
    let msgs = OP_MSG.find_iter(frame).count();
    if msgs == 0 {
        return false;
    }
    let mut seqs = SEQ_KEY.find_iter(frame);
    let mut datas = DATA_KEY.find_iter(frame);
    for _ in 0..msgs {
        let (Some(seq_at), Some(data_at)) = (seqs.next(), datas.next()) else {
            return false;
        };
        let Some((seq, _)) = payload::take_decimal(&frame[seq_at + SEQ_KEY.needle().len()..])
        else {
            return false;
        };
        let data = &frame[data_at + DATA_KEY.needle().len()..];
        deliveries.push(Delivery {
            payload: payload::decode(data),
            seq: Some(seq),
        });
    }
    seqs.next().is_none() && datas.next().is_none()
}

fn parse_json_full(
    frame: &[u8],
    deliveries: &mut Vec<Delivery>,
    replies: &mut Vec<Reply>,
) -> Result<()> {
    let value: serde_json::Value = serde_json::from_slice(frame).context("server sent bad JSON")?;
    match value {
        serde_json::Value::Array(items) => {
            for item in &items {
                json_object(item, deliveries, replies);
            }
        }
        other => json_object(&other, deliveries, replies),
    }
    Ok(())
}

fn json_object(obj: &serde_json::Value, deliveries: &mut Vec<Delivery>, replies: &mut Vec<Reply>) {
    let op = obj.get("op").and_then(|v| v.as_str()).unwrap_or("");
    let u64_field = |name: &str| obj.get(name).and_then(|v| v.as_u64());
    let str_field = |name: &str| {
        obj.get(name)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    match op {
        "msg" => deliveries.push(Delivery {
            payload: obj
                .get("data")
                .and_then(|d| d.as_str())
                .and_then(|d| payload::decode(d.as_bytes())),
            seq: u64_field("seq"),
        }),
        "ok" => replies.push(Reply::Ok {
            id: u64_field("id"),
            seq: u64_field("seq"),
        }),
        "err" => replies.push(Reply::Err {
            id: u64_field("id"),
            code: str_field("code"),
            message: str_field("message"),
        }),
        "pong" => replies.push(Reply::Pong),
        _ => replies.push(Reply::Other(obj.to_string())),
    }
}

fn parse_msgpack(
    frame: &[u8],
    deliveries: &mut Vec<Delivery>,
    replies: &mut Vec<Reply>,
) -> Result<()> {
    let mut input = frame;
    let value = rmpv::decode::read_value_ref(&mut input)
        .map_err(|e| anyhow!("server sent bad MessagePack: {e}"))?;
    match &value {
        ValueRef::Array(items) => {
            for item in items {
                msgpack_object(item, deliveries, replies);
            }
        }
        other => msgpack_object(other, deliveries, replies),
    }
    Ok(())
}

fn msgpack_object(obj: &ValueRef<'_>, deliveries: &mut Vec<Delivery>, replies: &mut Vec<Reply>) {
    let ValueRef::Map(entries) = obj else {
        replies.push(Reply::Other(format!("{obj:?}")));
        return;
    };
    let field = |name: &str| {
        entries
            .iter()
            .find(|(k, _)| value_str(k) == Some(name))
            .map(|(_, v)| v)
    };
    let u64_field = |name: &str| field(name).and_then(|v| v.as_u64());
    let str_field = |name: &str| field(name).and_then(value_str).unwrap_or("").to_string();
    match field("op").and_then(value_str) {
        Some("msg") => {
            let data = match field("data") {
                Some(ValueRef::String(s)) => Some(s.as_bytes()),
                Some(ValueRef::Binary(b)) => Some(*b),
                _ => None,
            };
            deliveries.push(Delivery {
                payload: data.and_then(payload::decode),
                seq: u64_field("seq"),
            });
        }
        Some("ok") => replies.push(Reply::Ok {
            id: u64_field("id"),
            seq: u64_field("seq"),
        }),
        Some("err") => replies.push(Reply::Err {
            id: u64_field("id"),
            code: str_field("code"),
            message: str_field("message"),
        }),
        Some("pong") => replies.push(Reply::Pong),
        _ => replies.push(Reply::Other(format!("{obj:?}"))),
    }
}

fn value_str<'a>(value: &'a ValueRef<'a>) -> Option<&'a str> {
    match value {
        ValueRef::String(s) => s.as_str(),
        _ => None,
    }
}

/// A Herald connection subscribed to one topic.
pub struct HeraldSubscriber {
    ws: SubscriberWs,
    parser: FrameParser,
    replies: Vec<Reply>,
    ok_seq: Option<u64>,
}

impl HeraldSubscriber {
    /// Connects, subscribes to `topic`, and waits for the `ok`.
    pub async fn open(
        url: &str,
        codec: Codec,
        mode: ParseMode,
        topic: &str,
        profile: BufferProfile,
    ) -> Result<Self> {
        let ws = SubscriberWs::connect(url, Some(subprotocol(codec)), profile).await?;
        let mut sub = HeraldSubscriber {
            ws,
            parser: FrameParser { codec, mode },
            replies: Vec::new(),
            ok_seq: None,
        };
        const SUB_ID: u64 = 1;
        let (sub_request, binary) = match encode_sub(codec, SUB_ID, topic) {
            Message::Text(text) => (text.as_bytes().to_vec(), false),
            other => (other.into_data().to_vec(), true),
        };
        sub.ws
            .send(&sub_request, binary)
            .await
            .context("sending sub")?;
        let confirmed = tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
            let mut ignored = Vec::new();
            loop {
                match sub.next_frame(&mut ignored).await? {
                    FrameOutcome::Closed { code } => {
                        bail!("closed before the subscription was confirmed (code {code:?})")
                    }
                    FrameOutcome::Data { .. } => {}
                }
                for reply in sub.replies.drain(..) {
                    match reply {
                        Reply::Ok {
                            id: Some(SUB_ID),
                            seq,
                        } => return Ok(seq),
                        Reply::Err { code, message, .. } => {
                            bail!("sub refused: {code}: {message}")
                        }
                        _ => {}
                    }
                }
            }
        })
        .await
        .context("timed out waiting for the sub's ok")??;
        sub.ok_seq = confirmed;
        Ok(sub)
    }
}

impl SubscriberConn for HeraldSubscriber {
    fn subscribed_at_seq(&self) -> Option<u64> {
        self.ok_seq
    }

    async fn next_frame(&mut self, out: &mut Vec<Delivery>) -> Result<FrameOutcome> {
        let frame = match self.ws.next().await.context("reading from herald")? {
            Incoming::Data(frame) => frame,
            Incoming::Closed(code) => return Ok(FrameOutcome::Closed { code }),
        };
        self.replies.clear();
        self.parser.parse(&frame, out, &mut self.replies)?;
        let server_errors = self
            .replies
            .iter()
            .filter(|r| matches!(r, Reply::Err { .. }))
            .count() as u32;
        Ok(FrameOutcome::Data { server_errors })
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(codec: Codec, mode: ParseMode, frame: &[u8]) -> (Vec<Delivery>, Vec<Reply>) {
        let mut deliveries = Vec::new();
        let mut replies = Vec::new();
        FrameParser { codec, mode }
            .parse(frame, &mut deliveries, &mut replies)
            .expect("parse");
        (deliveries, replies)
    }

    #[test]
    fn scan_and_full_agree_on_msg_arrays() {
        let frame = br#"[{"op":"msg","topic":"t","seq":5,"data":"3:1000:...."},{"op":"msg","topic":"t","data":"4:2000:","seq":6}]"#;
        let scan = parse(Codec::Json, ParseMode::Scan, frame);
        let full = parse(Codec::Json, ParseMode::Full, frame);
        assert_eq!(scan, full);
        assert_eq!(
            scan.0,
            vec![
                Delivery {
                    payload: Some((3, 1000)),
                    seq: Some(5)
                },
                Delivery {
                    payload: Some((4, 2000)),
                    seq: Some(6)
                },
            ]
        );
    }

    #[test]
    fn scan_falls_back_for_mixed_frames() {
        let frame = br#"[{"op":"ok","id":1,"seq":0,"epoch":"e"},{"op":"msg","topic":"t","seq":1,"data":"0:5:"}]"#;
        let (deliveries, replies) = parse(Codec::Json, ParseMode::Scan, frame);
        assert_eq!(
            deliveries,
            vec![Delivery {
                payload: Some((0, 5)),
                seq: Some(1)
            }]
        );
        assert_eq!(
            replies,
            vec![Reply::Ok {
                id: Some(1),
                seq: Some(0)
            }]
        );
    }

    #[test]
    fn msgpack_pub_and_msg() {
        let mut enc = PubEncoder::new(Codec::Msgpack, "a.b", 32);
        let Message::Binary(bytes) = enc.encode(Some(9), 2, 77) else {
            panic!("binary expected")
        };
        let value = rmpv::decode::read_value(&mut &bytes[..]).expect("decode");
        assert_eq!(value["op"].as_str(), Some("pub"));
        assert_eq!(value["id"].as_u64(), Some(9));

        let msg = rmpv::Value::Array(vec![rmpv::Value::Map(vec![
            ("op".into(), "msg".into()),
            ("seq".into(), 12u64.into()),
            ("data".into(), "2:77:....".into()),
        ])]);
        let mut frame = Vec::new();
        rmpv::encode::write_value(&mut frame, &msg).expect("encode");
        let (deliveries, _) = parse(Codec::Msgpack, ParseMode::Scan, &frame);
        assert_eq!(
            deliveries,
            vec![Delivery {
                payload: Some((2, 77)),
                seq: Some(12)
            }]
        );
    }

    #[test]
    fn json_pub_is_valid_json() {
        let mut enc = PubEncoder::new(Codec::Json, "a.b", 64);
        let Message::Text(text) = enc.encode(Some(3), 1, 2) else {
            panic!("text expected")
        };
        let value: serde_json::Value = serde_json::from_str(text.as_str()).expect("json");
        assert_eq!(value["op"], "pub");
        assert_eq!(value["id"], 3);
        assert_eq!(value["data"].as_str().map(str::len), Some(64));
    }

    #[test]
    fn unconfirmed_pub_has_no_id_in_either_codec() {
        let mut enc = PubEncoder::new(Codec::Json, "a.b", 16);
        let Message::Text(text) = enc.encode(None, 1, 2) else {
            panic!("text expected")
        };
        let value: serde_json::Value = serde_json::from_str(text.as_str()).expect("json");
        assert_eq!(value["op"], "pub");
        assert_eq!(value["topic"], "a.b");
        assert!(value.get("id").is_none(), "{value}");

        let mut enc = PubEncoder::new(Codec::Msgpack, "a.b", 16);
        let Message::Binary(bytes) = enc.encode(None, 1, 2) else {
            panic!("binary expected")
        };
        let value = rmpv::decode::read_value(&mut &bytes[..]).expect("decode");
        assert_eq!(value["op"].as_str(), Some("pub"));
        assert_eq!(value["topic"].as_str(), Some("a.b"));
        assert!(value["id"].is_nil(), "{value}");
    }

    #[test]
    fn ping_in_both_codecs() {
        let Message::Text(text) = encode_ping(Codec::Json, 7) else {
            panic!("text expected")
        };
        let value: serde_json::Value = serde_json::from_str(text.as_str()).expect("json");
        assert_eq!(value, serde_json::json!({"op": "ping", "id": 7}));
        let Message::Binary(bytes) = encode_ping(Codec::Msgpack, 7) else {
            panic!("binary expected")
        };
        let value = rmpv::decode::read_value(&mut &bytes[..]).expect("decode");
        assert_eq!(value["op"].as_str(), Some("ping"));
        assert_eq!(value["id"].as_u64(), Some(7));
    }
}
