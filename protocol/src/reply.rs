//! Server-to-client messages and their encoding.
//!
//! Encoding is by hand rather than through serde: these are the hot path of
//! fan-out, each is encoded once per codec and the bytes are shared by every
//! subscriber.

use bytes::Bytes;

use crate::codec::Codec;
use crate::data::Data;
use crate::error::ErrorCode;
use crate::trace::TraceParent;

/// A `msg`: one message delivered on a topic.
#[derive(Debug, Clone, Copy)]
pub struct MsgView<'a> {
    pub topic: &'a str,
    pub seq: u64,
    pub data: &'a Data,
    pub trace: Option<&'a TraceParent>,
    pub tracestate: Option<&'a str>,
}

/// An `ok` with the fields its request asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct OkReply<'a> {
    pub id: u64,
    pub seq: Option<u64>,
    pub epoch: Option<&'a str>,
    pub recovered: Option<bool>,
}

/// Every reply to a request.
#[derive(Debug, Clone, Copy)]
pub enum Reply<'a> {
    Ok(OkReply<'a>),
    Pong {
        id: u64,
    },
    Err {
        id: Option<u64>,
        code: ErrorCode,
        message: &'a str,
    },
}

impl Codec {
    /// Encodes one `msg` object.
    pub fn encode_msg(self, msg: &MsgView<'_>) -> Bytes {
        let mut out = Vec::with_capacity(64 + msg.topic.len() + msg.data.len());
        match self {
            Codec::Json => {
                out.extend_from_slice(b"{\"op\":\"msg\",\"topic\":");
                // Topics are restricted to characters JSON never escapes.
                json_str(&mut out, msg.topic);
                out.extend_from_slice(b",\"seq\":");
                json_u64(&mut out, msg.seq);
                out.extend_from_slice(b",\"data\":");
                msg.data.write_json(&mut out);
                if msg.data.is_binary() {
                    out.extend_from_slice(b",\"b64\":true");
                }
                if let Some(trace) = msg.trace {
                    out.extend_from_slice(b",\"trace\":\"");
                    out.extend_from_slice(trace.to_string().as_bytes());
                    out.push(b'"');
                }
                if let Some(state) = msg.tracestate {
                    out.extend_from_slice(b",\"tracestate\":");
                    json_str(&mut out, state);
                }
                out.push(b'}');
            }
            Codec::Msgpack => {
                let len = 4 + u32::from(msg.trace.is_some()) + u32::from(msg.tracestate.is_some());
                mp_map(&mut out, len);
                mp_str(&mut out, "op");
                mp_str(&mut out, "msg");
                mp_str(&mut out, "topic");
                mp_str(&mut out, msg.topic);
                mp_str(&mut out, "seq");
                mp_u64(&mut out, msg.seq);
                mp_str(&mut out, "data");
                msg.data.write_msgpack(&mut out);
                if let Some(trace) = msg.trace {
                    mp_str(&mut out, "trace");
                    mp_str(&mut out, &trace.to_string());
                }
                if let Some(state) = msg.tracestate {
                    mp_str(&mut out, "tracestate");
                    mp_str(&mut out, state);
                }
            }
        }
        Bytes::from(out)
    }

    /// Encodes one reply object (`ok`, `pong` or `err`).
    pub fn encode_reply(self, reply: &Reply<'_>) -> Bytes {
        let mut out = Vec::with_capacity(64);
        match (self, reply) {
            (Codec::Json, Reply::Ok(ok)) => {
                out.extend_from_slice(b"{\"op\":\"ok\",\"id\":");
                json_u64(&mut out, ok.id);
                if let Some(seq) = ok.seq {
                    out.extend_from_slice(b",\"seq\":");
                    json_u64(&mut out, seq);
                }
                if let Some(epoch) = ok.epoch {
                    out.extend_from_slice(b",\"epoch\":");
                    json_str(&mut out, epoch);
                }
                if let Some(recovered) = ok.recovered {
                    out.extend_from_slice(b",\"recovered\":");
                    out.extend_from_slice(if recovered { b"true" } else { b"false" });
                }
                out.push(b'}');
            }
            (Codec::Json, Reply::Pong { id }) => {
                out.extend_from_slice(b"{\"op\":\"pong\",\"id\":");
                json_u64(&mut out, *id);
                out.push(b'}');
            }
            (Codec::Json, Reply::Err { id, code, message }) => {
                out.extend_from_slice(b"{\"op\":\"err\",\"id\":");
                match id {
                    Some(id) => json_u64(&mut out, *id),
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b",\"code\":");
                json_str(&mut out, code.as_str());
                out.extend_from_slice(b",\"message\":");
                json_str(&mut out, message);
                out.push(b'}');
            }
            (Codec::Msgpack, Reply::Ok(ok)) => {
                let len = 2
                    + u32::from(ok.seq.is_some())
                    + u32::from(ok.epoch.is_some())
                    + u32::from(ok.recovered.is_some());
                mp_map(&mut out, len);
                mp_str(&mut out, "op");
                mp_str(&mut out, "ok");
                mp_str(&mut out, "id");
                mp_u64(&mut out, ok.id);
                if let Some(seq) = ok.seq {
                    mp_str(&mut out, "seq");
                    mp_u64(&mut out, seq);
                }
                if let Some(epoch) = ok.epoch {
                    mp_str(&mut out, "epoch");
                    mp_str(&mut out, epoch);
                }
                if let Some(recovered) = ok.recovered {
                    mp_str(&mut out, "recovered");
                    let _ = rmp::encode::write_bool(&mut out, recovered);
                }
            }
            (Codec::Msgpack, Reply::Pong { id }) => {
                mp_map(&mut out, 2);
                mp_str(&mut out, "op");
                mp_str(&mut out, "pong");
                mp_str(&mut out, "id");
                mp_u64(&mut out, *id);
            }
            (Codec::Msgpack, Reply::Err { id, code, message }) => {
                mp_map(&mut out, 4);
                mp_str(&mut out, "op");
                mp_str(&mut out, "err");
                mp_str(&mut out, "id");
                match id {
                    Some(id) => mp_u64(&mut out, *id),
                    None => {
                        let _ = rmp::encode::write_nil(&mut out);
                    }
                }
                mp_str(&mut out, "code");
                mp_str(&mut out, code.as_str());
                mp_str(&mut out, "message");
                mp_str(&mut out, message);
            }
        }
        Bytes::from(out)
    }
}

fn json_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

// Writing MessagePack into a Vec cannot fail, so these ignore the results.
fn mp_map(out: &mut Vec<u8>, len: u32) {
    let _ = rmp::encode::write_map_len(out, len);
}

fn mp_str(out: &mut Vec<u8>, s: &str) {
    let _ = rmp::encode::write_str(out, s);
}

fn mp_u64(out: &mut Vec<u8>, n: u64) {
    let _ = rmp::encode::write_uint(out, n);
}
