//! Client-to-server messages and their decoding from either codec.
//!
//! A frame holds one message object or an array of them. Each element is
//! decoded on its own, so one bad element gets its own error and the others
//! still run. Field errors keep the request's `id` when it was readable, so
//! the client can match the `err` to its request.

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::codec::Codec;
use crate::data::Data;
use crate::error::ErrorCode;
use crate::limits::MAX_TRACESTATE_BYTES;
use crate::topic::{GroupName, Pattern, Topic};
use crate::trace::TraceParent;

/// A decoded client request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Sub {
        id: u64,
        pattern: Pattern,
        group: Option<GroupName>,
        since: Option<u64>,
        epoch: Option<String>,
    },
    Unsub {
        id: u64,
        pattern: Pattern,
        group: Option<GroupName>,
    },
    Pub {
        id: Option<u64>,
        topic: Topic,
        data: Data,
        /// A valid `traceparent`; an invalid one is dropped (the contract
        /// says it is ignored).
        trace: Option<TraceParent>,
        tracestate: Option<String>,
    },
    Ping {
        id: u64,
    },
}

/// A request that cannot run: answered with `err`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    pub fn new(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        RequestError {
            id,
            code,
            message: message.into(),
        }
    }

    fn bad(id: Option<u64>, message: impl Into<String>) -> Self {
        RequestError::new(id, ErrorCode::BadRequest, message)
    }
}

/// Decodes one frame's payload into its requests, in order.
pub fn decode_frame(codec: Codec, payload: &[u8]) -> Vec<Result<Request, RequestError>> {
    match codec {
        Codec::Json => decode_json_frame(payload),
        Codec::Msgpack => decode_msgpack_frame(payload),
    }
}

/// One field's value, whichever codec it came from.
trait FieldValue {
    fn as_u64(&self) -> Option<u64>;
    fn as_string(&self) -> Option<String>;
    fn is_null(&self) -> bool;
    fn to_data(&self) -> Result<Data, String>;
}

impl FieldValue for &RawValue {
    fn as_u64(&self) -> Option<u64> {
        serde_json::from_str(self.get()).ok()
    }
    fn as_string(&self) -> Option<String> {
        serde_json::from_str(self.get()).ok()
    }
    fn is_null(&self) -> bool {
        self.get() == "null"
    }
    fn to_data(&self) -> Result<Data, String> {
        Data::from_raw_json(self).map_err(|e| e.to_string())
    }
}

impl FieldValue for rmpv::ValueRef<'_> {
    fn as_u64(&self) -> Option<u64> {
        rmpv::ValueRef::as_u64(self)
    }
    fn as_string(&self) -> Option<String> {
        match self {
            rmpv::ValueRef::String(s) => s.as_str().map(str::to_owned),
            _ => None,
        }
    }
    fn is_null(&self) -> bool {
        matches!(self, rmpv::ValueRef::Nil)
    }
    fn to_data(&self) -> Result<Data, String> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value_ref(&mut out, self);
        match self {
            rmpv::ValueRef::Binary(bytes) => Ok(Data::Binary(Bytes::copy_from_slice(bytes))),
            _ => Ok(Data::Msgpack(Bytes::from(out))),
        }
    }
}

/// The fields of one request object, not yet interpreted.
struct Fields<V> {
    op: Option<V>,
    id: Option<V>,
    topic: Option<V>,
    group: Option<V>,
    since: Option<V>,
    epoch: Option<V>,
    data: Option<V>,
    trace: Option<V>,
    tracestate: Option<V>,
}

impl<V> Default for Fields<V> {
    fn default() -> Self {
        Fields {
            op: None,
            id: None,
            topic: None,
            group: None,
            since: None,
            epoch: None,
            data: None,
            trace: None,
            tracestate: None,
        }
    }
}

impl<V> Fields<V> {
    fn slot(&mut self, name: &str) -> Option<&mut Option<V>> {
        Some(match name {
            "op" => &mut self.op,
            "id" => &mut self.id,
            "topic" => &mut self.topic,
            "group" => &mut self.group,
            "since" => &mut self.since,
            "epoch" => &mut self.epoch,
            "data" => &mut self.data,
            "trace" => &mut self.trace,
            "tracestate" => &mut self.tracestate,
            // Unknown fields are ignored, so clients may add their own.
            _ => return None,
        })
    }
}

fn interpret<V: FieldValue>(fields: Fields<V>) -> Result<Request, RequestError> {
    // An id that is present but not a u64 counts as missing (`id: null`).
    let id = fields.id.as_ref().and_then(FieldValue::as_u64);
    let op = fields
        .op
        .as_ref()
        .and_then(FieldValue::as_string)
        .ok_or_else(|| RequestError::bad(id, "missing or non-string `op`"))?;
    let required_id =
        || id.ok_or_else(|| RequestError::bad(None, format!("`{op}` needs an `id` that is a u64")));
    let string_field = |field: &Option<V>, name: &str| -> Result<Option<String>, RequestError> {
        match field {
            None => Ok(None),
            Some(v) if v.is_null() => Ok(None),
            Some(v) => v
                .as_string()
                .map(Some)
                .ok_or_else(|| RequestError::bad(id, format!("`{name}` must be a string"))),
        }
    };
    let topic_text = || {
        string_field(&fields.topic, "topic")?
            .ok_or_else(|| RequestError::bad(id, "missing `topic`"))
    };
    let group = || -> Result<Option<GroupName>, RequestError> {
        string_field(&fields.group, "group")?
            .map(|g| {
                GroupName::parse(&g).map_err(|e| RequestError::new(id, e.code(), e.to_string()))
            })
            .transpose()
    };
    let pattern = |text: &str| {
        Pattern::parse(text).map_err(|e| RequestError::new(id, e.code(), e.to_string()))
    };

    match op.as_str() {
        "sub" => {
            let id = required_id()?;
            let since = match &fields.since {
                None => None,
                Some(v) if v.is_null() => None,
                Some(v) => Some(
                    v.as_u64()
                        .ok_or_else(|| RequestError::bad(Some(id), "`since` must be a u64"))?,
                ),
            };
            Ok(Request::Sub {
                id,
                pattern: pattern(&topic_text()?)?,
                group: group()?,
                since,
                epoch: string_field(&fields.epoch, "epoch")?,
            })
        }
        "unsub" => {
            let id = required_id()?;
            Ok(Request::Unsub {
                id,
                pattern: pattern(&topic_text()?)?,
                group: group()?,
            })
        }
        "pub" => {
            // The id is optional on `pub`, but one that is there and not a
            // u64 is an error: the client asked for an ack it cannot get.
            if id.is_none() && fields.id.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(RequestError::bad(None, "`pub` `id` must be a u64"));
            }
            let text = topic_text()?;
            let topic =
                Topic::parse(&text).map_err(|e| RequestError::new(id, e.code(), e.to_string()))?;
            let data = fields
                .data
                .as_ref()
                .ok_or_else(|| RequestError::bad(id, "missing `data` (it may be null)"))?
                .to_data()
                .map_err(|why| RequestError::bad(id, format!("`data`: {why}")))?;
            let trace = string_field(&fields.trace, "trace")?.and_then(|t| TraceParent::parse(&t));
            let tracestate = string_field(&fields.tracestate, "tracestate")?;
            if tracestate
                .as_ref()
                .is_some_and(|s| s.len() > MAX_TRACESTATE_BYTES)
            {
                return Err(RequestError::new(
                    id,
                    ErrorCode::LimitExceeded,
                    format!("`tracestate` is over {MAX_TRACESTATE_BYTES} bytes"),
                ));
            }
            Ok(Request::Pub {
                id,
                topic,
                data,
                trace,
                tracestate,
            })
        }
        "ping" => Ok(Request::Ping { id: required_id()? }),
        other => Err(RequestError::bad(id, format!("unknown op `{other}`"))),
    }
}

fn decode_json_frame(payload: &[u8]) -> Vec<Result<Request, RequestError>> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        match serde_json::from_slice::<Vec<&RawValue>>(payload) {
            Ok(elements) => elements.into_iter().map(decode_json_element).collect(),
            Err(e) => vec![Err(RequestError::bad(None, format!("malformed JSON: {e}")))],
        }
    } else {
        match serde_json::from_slice::<&RawValue>(payload) {
            Ok(element) => vec![decode_json_element(element)],
            Err(e) => vec![Err(RequestError::bad(None, format!("malformed JSON: {e}")))],
        }
    }
}

fn decode_json_element(element: &RawValue) -> Result<Request, RequestError> {
    let Some(pairs) = parse_json_object(element.get()) else {
        return Err(RequestError::bad(None, "a message must be a JSON object"));
    };
    let mut fields = Fields::default();
    for (name, value) in pairs {
        if let Some(slot) = fields.slot(name) {
            if slot.replace(value).is_some() {
                return Err(RequestError::bad(None, format!("duplicate field `{name}`")));
            }
        }
    }
    interpret(fields)
}

/// Parses a JSON object into its (key, raw value) pairs without parsing the
/// values; `None` when the text is not an object.
fn parse_json_object(text: &str) -> Option<Vec<(&str, &RawValue)>> {
    use serde::de::{Deserializer, MapAccess, Visitor};

    struct PairsVisitor;
    impl<'de> Visitor<'de> for PairsVisitor {
        type Value = Vec<(&'de str, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::new();
            while let Some(key) = map.next_key::<&'de str>()? {
                pairs.push((key, map.next_value::<&'de RawValue>()?));
            }
            Ok(pairs)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(PairsVisitor).ok()
}

fn decode_msgpack_frame(payload: &[u8]) -> Vec<Result<Request, RequestError>> {
    let mut reader = payload;
    let value = match rmpv::decode::read_value_ref(&mut reader) {
        Ok(value) => value,
        Err(e) => {
            return vec![Err(RequestError::bad(
                None,
                format!("malformed MessagePack: {e}"),
            ))]
        }
    };
    if !reader.is_empty() {
        return vec![Err(RequestError::bad(
            None,
            "trailing bytes after the MessagePack value",
        ))];
    }
    match value {
        rmpv::ValueRef::Array(elements) => {
            elements.into_iter().map(decode_msgpack_element).collect()
        }
        element => vec![decode_msgpack_element(element)],
    }
}

fn decode_msgpack_element(element: rmpv::ValueRef<'_>) -> Result<Request, RequestError> {
    let rmpv::ValueRef::Map(entries) = element else {
        return Err(RequestError::bad(
            None,
            "a message must be a map with string keys",
        ));
    };
    let mut fields = Fields::default();
    for (key, value) in entries {
        let rmpv::ValueRef::String(name) = key else {
            return Err(RequestError::bad(None, "map keys must be strings"));
        };
        let Some(name) = name.as_str() else {
            return Err(RequestError::bad(None, "map keys must be strings"));
        };
        if let Some(slot) = fields.slot(name) {
            if slot.replace(value).is_some() {
                return Err(RequestError::bad(None, format!("duplicate field `{name}`")));
            }
        }
    }
    interpret(fields)
}
