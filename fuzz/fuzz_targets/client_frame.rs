//! A client's WebSocket frame, in either codec, as the node decodes it.
//!
//! Beyond "no panic", every decoded request must turn into replies that are
//! valid in both codecs: an `err` echoes whatever text the client sent, and a
//! `pub`'s data is delivered to subscribers of both codecs. The first input
//! byte picks the codec; the rest is the frame's payload.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{decode_frame, Codec, Data, MsgView, Reply, Request};

fuzz_target!(|input: &[u8]| {
    let Some((&selector, payload)) = input.split_first() else {
        return;
    };
    let codec = if selector & 1 == 0 {
        Codec::Json
    } else {
        Codec::Msgpack
    };
    // An empty array is a frame of no requests, answered by nothing.
    for result in decode_frame(codec, payload) {
        match result {
            Err(e) => {
                assert!(!e.message.is_empty());
                let reply = Reply::Err {
                    id: e.id,
                    code: e.code,
                    message: &e.message,
                };
                let json = Codec::Json.encode_reply(&reply);
                let value: serde_json::Value =
                    serde_json::from_slice(&json).expect("an err is valid JSON");
                assert_eq!(value["message"].as_str(), Some(e.message.as_str()));
                let packed = Codec::Msgpack.encode_reply(&reply);
                one_msgpack_value(&packed);
            }
            Ok(Request::Pub {
                topic,
                data,
                trace,
                tracestate,
                ..
            }) => {
                let msg = MsgView {
                    topic: topic.as_str(),
                    seq: 1,
                    data: &data,
                    trace: trace.as_ref(),
                    tracestate: tracestate.as_deref(),
                };
                let json = Codec::Json.encode_msg(&msg);
                let value: serde_json::Value =
                    serde_json::from_slice(&json).expect("a msg is valid JSON");
                assert_eq!(value["topic"].as_str(), Some(topic.as_str()));
                assert_eq!(value["tracestate"].as_str(), tracestate.as_deref());
                let packed = Codec::Msgpack.encode_msg(&msg);
                one_msgpack_value(&packed);
                no_nil_in_place_of(&data);
            }
            Ok(_) => {}
        }
    }
});

/// The bytes hold exactly one MessagePack value.
fn one_msgpack_value(bytes: &[u8]) {
    let mut rest = bytes;
    rmpv::decode::read_value(&mut rest).expect("valid MessagePack");
    assert!(rest.is_empty(), "trailing bytes after the value");
}

/// Data converted for the other codec is the data, not the `nil`/`null`
/// the conversions fall back to.
fn no_nil_in_place_of(data: &Data) {
    match data {
        Data::Json(text) => {
            let mut packed = Vec::new();
            data.write_msgpack(&mut packed);
            if packed == [0xc0] {
                assert_eq!(&text[..], b"null", "JSON data became nil");
            }
        }
        Data::Msgpack(bytes) => {
            let mut json = Vec::new();
            data.write_json(&mut json);
            serde_json::from_slice::<serde_json::Value>(&json).expect("data as JSON is JSON");
            if json == b"null" {
                let value = rmpv::decode::read_value(&mut &bytes[..]).expect("valid");
                assert!(
                    value.is_nil() || value.as_f64().is_some_and(|f| !f.is_finite()),
                    "MessagePack data became null"
                );
            }
        }
        Data::Binary(_) => {}
    }
}
