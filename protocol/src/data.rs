//! Message payloads (`data`), kept in the encoding they arrived in and
//! transcoded at most once per codec when delivered.

use base64::Engine;
use bytes::Bytes;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// A message's `data`. Between nodes it travels as a MessagePack enum whose
/// payload is a `bin` (the bytes as they arrived; peers are authenticated
/// Herald nodes, so the JSON is not re-validated on every hop).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Data {
    /// A JSON value, as (valid) JSON text.
    Json(Bytes),
    /// A MessagePack value that is not binary at its top level.
    Msgpack(Bytes),
    /// Binary data: a msgpack `bin`, or an HTTP body that is not JSON.
    Binary(Bytes),
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Data::Json(b) => write!(f, "Json({})", String::from_utf8_lossy(b)),
            Data::Msgpack(b) => write!(f, "Msgpack({} bytes)", b.len()),
            Data::Binary(b) => write!(f, "Binary({} bytes)", b.len()),
        }
    }
}

/// JSON `data` that is refused at publish.
#[derive(Debug, thiserror::Error)]
pub enum InvalidJson {
    /// Not JSON at all.
    #[error("invalid JSON: {0}")]
    Syntax(serde_json::Error),
    /// Well-formed JSON that a MessagePack subscriber could not be given
    /// as it is (see [`check_transcodable`]).
    #[error(
        "JSON data must have numbers within 64-bit float range, strings of valid \
         Unicode and at most {MAX_JSON_DEPTH} levels of nesting: {0}"
    )]
    Untranscodable(serde_json::Error),
}

/// How deeply JSON `data` may nest: what `serde_json` parses into a value,
/// which is how JSON data is turned into MessagePack.
pub const MAX_JSON_DEPTH: usize = 127;

impl Data {
    /// JSON `null`.
    pub fn null() -> Data {
        Data::Json(Bytes::from_static(b"null"))
    }

    /// Validates JSON text (an HTTP body) and keeps it as the payload.
    pub fn from_json_text(text: &[u8]) -> Result<Data, InvalidJson> {
        let raw: &RawValue = serde_json::from_slice(text).map_err(InvalidJson::Syntax)?;
        Data::from_raw_json(raw)
    }

    /// Keeps one well-formed JSON value as the payload, once it is known
    /// that every subscriber can receive it.
    pub fn from_raw_json(raw: &RawValue) -> Result<Data, InvalidJson> {
        check_transcodable(raw.get()).map_err(InvalidJson::Untranscodable)?;
        Ok(Data::Json(Bytes::copy_from_slice(raw.get().as_bytes())))
    }

    /// Size of the payload as it arrived, which the message size limit counts.
    pub fn len(&self) -> usize {
        match self {
            Data::Json(b) | Data::Msgpack(b) | Data::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_binary(&self) -> bool {
        matches!(self, Data::Binary(_))
    }

    /// Appends the value as JSON. Binary data becomes a base64 string (the
    /// caller marks the message `b64: true`); binary nested inside a msgpack
    /// value becomes a base64 string too.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Data::Json(text) => out.extend_from_slice(text),
            Data::Binary(bytes) => write_base64_string(bytes, out),
            Data::Msgpack(bytes) => match rmpv::decode::read_value(&mut &bytes[..]) {
                Ok(value) => msgpack_value_to_json(&value, out),
                // Msgpack payloads are validated when they are decoded, so
                // this cannot happen; null is the least surprising fallback.
                Err(_) => out.extend_from_slice(b"null"),
            },
        }
    }

    /// Appends the value as MessagePack.
    pub fn write_msgpack(&self, out: &mut Vec<u8>) {
        match self {
            Data::Msgpack(bytes) => out.extend_from_slice(bytes),
            Data::Binary(bytes) => {
                // Writing into a Vec cannot fail.
                let _ = rmp::encode::write_bin(out, bytes);
            }
            Data::Json(text) => match serde_json::from_slice::<serde_json::Value>(text) {
                Ok(value) => json_value_to_msgpack(&value, out),
                Err(_) => {
                    let _ = rmp::encode::write_nil(out);
                }
            },
        }
    }
}

/// Checks that well-formed JSON parses into a `serde_json::Value`, which is
/// what [`Data::write_msgpack`] does for MessagePack subscribers.
///
/// Skimming JSON (as `RawValue` does) accepts text that a full parse refuses:
/// numbers beyond `f64` (`1e400`), lone UTF-16 surrogates in escapes, and
/// nesting past the parser's depth limit. Accepting those at publish would
/// hand MessagePack subscribers `nil` in place of the data, so they are
/// refused at publish instead. This walks the text with the same parser and
/// limits as that conversion, without building the value.
pub fn check_transcodable(text: &str) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    Checked::deserialize(&mut de)?;
    de.end()
}

/// A JSON value parsed for its errors only.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        // `deserialize_any` (not `deserialize_ignored_any`, which skims):
        // numbers, strings and depth are checked as a `Value` parse checks them.
        de.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Checked>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

fn write_base64_string(bytes: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    let start = out.len();
    out.resize(
        start + base64::encoded_len(bytes.len(), true).unwrap_or(0),
        0,
    );
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
    out.push(b'"');
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    // Serializing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn msgpack_value_to_json(value: &rmpv::Value, out: &mut Vec<u8>) {
    use rmpv::Value;
    match value {
        Value::Nil => out.extend_from_slice(b"null"),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Integer(i) => {
            if let Some(u) = i.as_u64() {
                out.extend_from_slice(itoa::Buffer::new().format(u).as_bytes());
            } else if let Some(s) = i.as_i64() {
                out.extend_from_slice(itoa::Buffer::new().format(s).as_bytes());
            }
        }
        Value::F32(f) => write_json_float(f64::from(*f), out),
        Value::F64(f) => write_json_float(*f, out),
        Value::String(s) => match s.as_str() {
            Some(text) => write_json_string(text, out),
            None => write_json_string(&String::from_utf8_lossy(s.as_bytes()), out),
        },
        Value::Binary(bytes) => write_base64_string(bytes, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                msgpack_value_to_json(item, out);
            }
            out.push(b']');
        }
        Value::Map(entries) => {
            out.push(b'{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match key {
                    Value::String(s) => {
                        write_json_string(&String::from_utf8_lossy(s.as_bytes()), out)
                    }
                    // JSON keys are strings: other keys are written as their
                    // JSON text, quoted.
                    other => {
                        let mut text = Vec::new();
                        msgpack_value_to_json(other, &mut text);
                        write_json_string(&String::from_utf8_lossy(&text), out);
                    }
                }
                out.push(b':');
                msgpack_value_to_json(item, out);
            }
            out.push(b'}');
        }
        Value::Ext(_, bytes) => write_base64_string(bytes, out),
    }
}

fn write_json_float(f: f64, out: &mut Vec<u8>) {
    if f.is_finite() {
        let _ = serde_json::to_writer(&mut *out, &f);
    } else {
        // JSON has no NaN or infinity.
        out.extend_from_slice(b"null");
    }
}

fn json_value_to_msgpack(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    // Writing into a Vec cannot fail, so the results are ignored.
    match value {
        Value::Null => {
            let _ = rmp::encode::write_nil(out);
        }
        Value::Bool(b) => {
            let _ = rmp::encode::write_bool(out, *b);
        }
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                let _ = rmp::encode::write_uint(out, u);
            } else if let Some(i) = n.as_i64() {
                let _ = rmp::encode::write_sint(out, i);
            } else {
                let _ = rmp::encode::write_f64(out, n.as_f64().unwrap_or(0.0));
            }
        }
        Value::String(s) => {
            let _ = rmp::encode::write_str(out, s);
        }
        Value::Array(items) => {
            let _ = rmp::encode::write_array_len(out, items.len() as u32);
            for item in items {
                json_value_to_msgpack(item, out);
            }
        }
        Value::Object(map) => {
            let _ = rmp::encode::write_map_len(out, map.len() as u32);
            for (key, item) in map {
                let _ = rmp::encode::write_str(out, key);
                json_value_to_msgpack(item, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(data: &Data) -> String {
        let mut out = Vec::new();
        data.write_json(&mut out);
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn json_round_trips_through_msgpack() {
        let original = r#"{"a":[1,-2,3.5,"x",null,true],"b":{"c":"é\"q"}}"#;
        let data = Data::from_json_text(original.as_bytes()).expect("valid");
        let mut packed = Vec::new();
        data.write_msgpack(&mut packed);
        let back = Data::Msgpack(Bytes::from(packed));
        let v1: serde_json::Value = serde_json::from_str(original).expect("json");
        let v2: serde_json::Value = serde_json::from_str(&json_of(&back)).expect("json");
        assert_eq!(v1, v2);
    }

    #[test]
    fn binary_is_base64_for_json() {
        let data = Data::Binary(Bytes::from_static(&[0, 1, 2, 255]));
        assert_eq!(json_of(&data), "\"AAEC/w==\"");
        let mut packed = Vec::new();
        data.write_msgpack(&mut packed);
        assert_eq!(packed, vec![0xc4, 4, 0, 1, 2, 255]);
    }

    #[test]
    fn json_a_msgpack_subscriber_could_not_get_is_refused() {
        let nested = |depth: usize| "[".repeat(depth) + &"]".repeat(depth);
        for text in [
            "1e400".to_owned(),
            "[-1e400]".to_owned(),
            r#"{"k":"\ud800"}"#.to_owned(),
            r#"{"\udc00":1}"#.to_owned(),
            nested(MAX_JSON_DEPTH + 1),
        ] {
            let refused = Data::from_json_text(text.as_bytes());
            assert!(
                matches!(refused, Err(InvalidJson::Untranscodable(_))),
                "{text:.20}: {refused:?}"
            );
        }
        for text in [
            "1e308".to_owned(),
            "123456789012345678901234567890".to_owned(),
            r#""\ud83d\ude00""#.to_owned(),
            nested(MAX_JSON_DEPTH),
        ] {
            let data = Data::from_json_text(text.as_bytes()).expect(&text);
            let mut packed = Vec::new();
            data.write_msgpack(&mut packed);
            assert_ne!(packed, [0xc0], "{text:.20} became nil");
        }
    }

    proptest::proptest! {
        /// Publish accepts exactly the JSON that can be turned into
        /// MessagePack: never more (a subscriber would get nil), never less.
        #[test]
        fn publish_accepts_exactly_the_json_msgpack_subscribers_can_get(text in json_like()) {
            let accepted = Data::from_json_text(text.as_bytes()).is_ok();
            let parses = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            proptest::prop_assert_eq!(accepted, parses, "{}", text);
        }
    }

    /// JSON text rich in the corners where skimming and parsing differ:
    /// huge exponents, surrogate escapes; sometimes not JSON at all.
    fn json_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let number = "-?[0-9]{1,3}(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?";
        let string = r#""([a-z ]|\\u[dD][89abcdefABCDEF][0-9a-f]{2}|\\u00[0-9a-f]{2}|\\[nt"])*""#;
        let leaf = prop_oneof![
            number.prop_map(|s| s),
            string.prop_map(|s| s),
            Just("true".to_owned()),
            Just("null".to_owned()),
            "[{}\\[\\],:\"a-z0-9 ]{0,8}".prop_map(|s| s),
        ];
        leaf.prop_recursive(6, 64, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                proptest::collection::vec((string, inner), 0..6).prop_map(|pairs| {
                    let fields: Vec<String> =
                        pairs.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        })
    }

    #[test]
    fn invalid_json_is_refused() {
        assert!(Data::from_json_text(b"{nope").is_err());
        assert!(Data::from_json_text(b"").is_err());
        assert_eq!(
            Data::from_json_text(b"  [1, 2]\n").expect("valid"),
            Data::Json(Bytes::from_static(b"[1, 2]"))
        );
    }
}
