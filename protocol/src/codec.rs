//! The two client codecs, chosen by WebSocket subprotocol, and frame assembly.

use bytes::{BufMut, Bytes, BytesMut};

/// The client offered subprotocols, none of them Herald's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no supported subprotocol offered (herald.v1.json, herald.v1.msgpack)")]
pub struct NoKnownSubprotocol;

/// How a session's frames are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// UTF-8 text frames holding JSON.
    Json,
    /// Binary frames holding MessagePack maps with string keys.
    Msgpack,
}

impl Codec {
    pub const ALL: [Codec; 2] = [Codec::Json, Codec::Msgpack];

    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::Json => "herald.v1.json",
            Codec::Msgpack => "herald.v1.msgpack",
        }
    }

    pub fn from_subprotocol(name: &str) -> Option<Codec> {
        Codec::ALL
            .into_iter()
            .find(|c| c.subprotocol() == name.trim())
    }

    /// The codec for a `Sec-WebSocket-Protocol` offer (a comma-separated
    /// list): the first known one offered wins. `Ok(None)` when nothing was
    /// offered (json, and no header in the reply); `Err` when only unknown
    /// ones were.
    pub fn negotiate<'a>(
        offers: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<Codec>, NoKnownSubprotocol> {
        let mut offered_any = false;
        for offer in offers {
            for name in offer.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                offered_any = true;
                if let Some(codec) = Codec::from_subprotocol(name) {
                    return Ok(Some(codec));
                }
            }
        }
        if offered_any {
            Err(NoKnownSubprotocol)
        } else {
            Ok(None)
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Msgpack => "msgpack",
        }
    }

    /// Puts encoded objects into one frame payload: the object itself when
    /// there is one, an array of them otherwise.
    pub fn join(self, objects: &[Bytes]) -> Bytes {
        match objects {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let body: usize = many.iter().map(Bytes::len).sum();
                let mut out = BytesMut::with_capacity(body + many.len() + 8);
                match self {
                    Codec::Json => {
                        out.put_u8(b'[');
                        for (i, object) in many.iter().enumerate() {
                            if i > 0 {
                                out.put_u8(b',');
                            }
                            out.put_slice(object);
                        }
                        out.put_u8(b']');
                    }
                    Codec::Msgpack => {
                        let mut header = Vec::with_capacity(5);
                        // Writing into a Vec cannot fail.
                        let _ = rmp::encode::write_array_len(&mut header, many.len() as u32);
                        out.put_slice(&header);
                        for object in many {
                            out.put_slice(object);
                        }
                    }
                }
                out.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Data;
    use crate::error::ErrorCode;
    use crate::reply::{MsgView, OkReply, Reply};
    use crate::request::{decode_frame, Request};
    use crate::topic::{Pattern, Topic};
    use crate::trace::TraceParent;

    #[test]
    fn negotiation_follows_the_contract() {
        assert_eq!(Codec::negotiate([]), Ok(None));
        assert_eq!(
            Codec::negotiate(["herald.v1.msgpack"]),
            Ok(Some(Codec::Msgpack))
        );
        assert_eq!(
            Codec::negotiate(["foo, herald.v1.json, herald.v1.msgpack"]),
            Ok(Some(Codec::Json))
        );
        assert_eq!(Codec::negotiate(["foo", "bar"]), Err(NoKnownSubprotocol));
    }

    #[test]
    fn json_requests_decode() {
        let frame = br#"[{"op":"sub","id":1,"topic":"a.*","group":"g","since":3,"epoch":"e"},
            {"op":"pub","topic":"a.b","data":{"x":1},"trace":"bad"},
            {"op":"ping","id":18446744073709551615},
            {"op":"ping"},
            {"op":"nope","id":7},
            {"op":"pub","id":8,"topic":"a.*","data":1},
            {"op":"pub","id":9,"topic":"a"},
            5]"#;
        let results = decode_frame(Codec::Json, frame);
        assert_eq!(results.len(), 8);
        match &results[0] {
            Ok(Request::Sub {
                id: 1,
                pattern,
                group: Some(g),
                since: Some(3),
                epoch: Some(e),
            }) => {
                assert_eq!(pattern, &Pattern::parse("a.*").expect("pattern"));
                assert_eq!(g.as_str(), "g");
                assert_eq!(e, "e");
            }
            other => panic!("{other:?}"),
        }
        match &results[1] {
            Ok(Request::Pub {
                id: None,
                topic,
                data,
                trace: None,
                tracestate: None,
            }) => {
                assert_eq!(topic, &Topic::parse("a.b").expect("topic"));
                assert_eq!(data, &Data::Json(Bytes::from_static(br#"{"x":1}"#)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(results[2], Ok(Request::Ping { id: u64::MAX }));
        assert_eq!(results[3].as_ref().map_err(|e| e.id), Err(None));
        assert_eq!(
            results[4].as_ref().map_err(|e| (e.id, e.code)),
            Err((Some(7), ErrorCode::BadRequest))
        );
        assert_eq!(
            results[5].as_ref().map_err(|e| (e.id, e.code)),
            Err((Some(8), ErrorCode::BadRequest))
        );
        assert_eq!(
            results[6].as_ref().map_err(|e| (e.id, e.code)),
            Err((Some(9), ErrorCode::BadRequest))
        );
        assert!(results[7].is_err());
    }

    #[test]
    fn a_pub_whose_data_msgpack_cannot_carry_is_refused_alone() {
        let frame = br#"[{"op":"pub","id":1,"topic":"a","data":1e400},
            {"op":"pub","id":2,"topic":"a","data":{"n":1e300}}]"#;
        let results = decode_frame(Codec::Json, frame);
        let refused = results[0].as_ref().expect_err("1e400 is not an f64");
        assert_eq!((refused.id, refused.code), (Some(1), ErrorCode::BadRequest));
        assert!(
            refused.message.contains("64-bit float"),
            "{}",
            refused.message
        );
        assert!(matches!(results[1], Ok(Request::Pub { id: Some(2), .. })));
    }

    proptest::proptest! {
        /// Any bytes, in either codec: decoding never panics, and every
        /// error becomes an `err` that is valid JSON carrying its message
        /// (the fuzz target `client_frame` checks this and more, at length).
        #[test]
        fn any_frame_decodes_to_answers_that_encode(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            msgpack in proptest::prelude::any::<bool>(),
        ) {
            let codec = if msgpack { Codec::Msgpack } else { Codec::Json };
            for result in decode_frame(codec, &payload) {
                if let Err(e) = result {
                    let reply = Reply::Err { id: e.id, code: e.code, message: &e.message };
                    let json = Codec::Json.encode_reply(&reply);
                    let value: serde_json::Value =
                        serde_json::from_slice(&json).expect("an err is JSON");
                    proptest::prop_assert_eq!(value["message"].as_str(), Some(e.message.as_str()));
                }
            }
        }
    }

    #[test]
    fn malformed_frames_are_one_error() {
        for frame in [&b"{"[..], b"[1,", b"", b"\xff"] {
            let results = decode_frame(Codec::Json, frame);
            assert_eq!(results.len(), 1);
            assert_eq!(results[0].as_ref().map_err(|e| e.id), Err(None));
        }
        let results = decode_frame(Codec::Msgpack, &[0xc1]);
        assert_eq!(results.len(), 1);
        assert!(results[0].is_err());
    }

    #[test]
    fn negative_and_float_ids_are_not_ids() {
        for frame in [
            &br#"{"op":"ping","id":-1}"#[..],
            br#"{"op":"ping","id":1.5}"#,
            br#"{"op":"ping","id":"1"}"#,
            br#"{"op":"ping","id":18446744073709551616}"#,
        ] {
            let results = decode_frame(Codec::Json, frame);
            assert_eq!(
                results[0].as_ref().map_err(|e| e.id),
                Err(None),
                "{}",
                String::from_utf8_lossy(frame)
            );
        }
    }

    #[test]
    fn pub_id_is_optional_but_must_be_a_u64_when_given() {
        let results = decode_frame(
            Codec::Json,
            br#"[{"op":"pub","id":-5,"topic":"a","data":1},{"op":"pub","id":null,"topic":"a","data":1}]"#,
        );
        assert_eq!(results[0].as_ref().map_err(|e| e.id), Err(None));
        assert!(matches!(results[1], Ok(Request::Pub { id: None, .. })));
    }

    #[test]
    fn msgpack_requests_decode_with_binary_data() {
        let mut frame = Vec::new();
        rmp::encode::write_map_len(&mut frame, 4).expect("vec");
        for (k, v) in [("op", "pub"), ("topic", "a.b")] {
            rmp::encode::write_str(&mut frame, k).expect("vec");
            rmp::encode::write_str(&mut frame, v).expect("vec");
        }
        rmp::encode::write_str(&mut frame, "id").expect("vec");
        rmp::encode::write_uint(&mut frame, 3).expect("vec");
        rmp::encode::write_str(&mut frame, "data").expect("vec");
        rmp::encode::write_bin(&mut frame, &[1, 2, 3]).expect("vec");
        let results = decode_frame(Codec::Msgpack, &frame);
        match &results[0] {
            Ok(Request::Pub {
                id: Some(3), data, ..
            }) => {
                assert_eq!(data, &Data::Binary(Bytes::from_static(&[1, 2, 3])));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn msg_encodes_in_both_codecs() {
        let data = Data::Binary(Bytes::from_static(b"hi"));
        let trace = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let view = MsgView {
            topic: "a.b",
            seq: 7,
            data: &data,
            trace: trace.as_ref(),
            tracestate: Some("k=v"),
        };
        let json: serde_json::Value =
            serde_json::from_slice(&Codec::Json.encode_msg(&view)).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"op":"msg","topic":"a.b","seq":7,"data":"aGk=","b64":true,
                "trace":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","tracestate":"k=v"})
        );
        let packed = Codec::Msgpack.encode_msg(&view);
        let value = rmpv::decode::read_value(&mut &packed[..]).expect("msgpack");
        let map = value.as_map().expect("map");
        assert_eq!(map.len(), 6);
        assert_eq!(map[3].1, rmpv::Value::Binary(b"hi".to_vec()));
    }

    #[test]
    fn replies_encode_and_frames_join() {
        let ok = Codec::Json.encode_reply(&Reply::Ok(OkReply {
            id: 1,
            seq: Some(0),
            epoch: Some("e1"),
            recovered: Some(false),
        }));
        let err = Codec::Json.encode_reply(&Reply::Err {
            id: None,
            code: ErrorCode::BadRequest,
            message: "no \"op\"",
        });
        let frame = Codec::Json.join(&[ok, err]);
        let value: serde_json::Value = serde_json::from_slice(&frame).expect("json");
        assert_eq!(
            value,
            serde_json::json!([{"op":"ok","id":1,"seq":0,"epoch":"e1","recovered":false},
                {"op":"err","id":null,"code":"bad_request","message":"no \"op\""}])
        );
        let pong = Codec::Msgpack.encode_reply(&Reply::Pong { id: 5 });
        let frame = Codec::Msgpack.join(&[pong.clone(), pong]);
        let value = rmpv::decode::read_value(&mut &frame[..]).expect("msgpack");
        assert_eq!(value.as_array().map(Vec::len), Some(2));
    }
}
