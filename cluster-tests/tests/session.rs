//! The WebSocket session itself: subprotocol negotiation, codecs and frame
//! types, request ids, array frames, malformed input. Every bad input is
//! followed by a check that the same session still works.

use anyhow::{ensure, Result};
use cluster_tests::http::raw_upgrade;
use cluster_tests::{check_err, mp_bin, Codec, Node, MSGPACK, QUIET};
use serde_json::{json, Value};

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn no_subprotocol_offered_means_json_and_no_header() -> Result<()> {
    let node = Node::start(&[]).await?;
    let (status, headers) = raw_upgrade(node.client_addr(), "/ws", &[]).await?;
    ensure!(status == 101, "upgrade answered {status}");
    ensure!(
        header(&headers, "sec-websocket-protocol").is_none(),
        "server sent a subprotocol nobody offered: {headers:?}"
    );
    let mut ws = node.ws().await?;
    ensure!(ws.protocol().is_none());
    // json: a text frame is understood and answered with a text frame.
    ws.send_raw_text(r#"{"op":"ping","id":7}"#).await?;
    ws.expect_pong(7).await?;
    ws.close().await
}

#[tokio::test]
async fn msgpack_subprotocol_is_echoed() -> Result<()> {
    let node = Node::start(&[]).await?;
    let (status, headers) = raw_upgrade(
        node.client_addr(),
        "/ws",
        &[("Sec-WebSocket-Protocol", MSGPACK)],
    )
    .await?;
    ensure!(status == 101, "upgrade answered {status}");
    ensure!(header(&headers, "sec-websocket-protocol") == Some(MSGPACK));
    let (status, headers) = raw_upgrade(
        node.client_addr(),
        "/ws",
        &[("Sec-WebSocket-Protocol", "herald.v1.json")],
    )
    .await?;
    ensure!(status == 101, "upgrade answered {status}");
    ensure!(header(&headers, "sec-websocket-protocol") == Some("herald.v1.json"));
    Ok(())
}

#[tokio::test]
async fn only_unknown_subprotocols_are_refused_with_400() -> Result<()> {
    let node = Node::start(&[]).await?;
    for offer in ["mqtt", "herald.v2.json, chat", "HERALD.V1.JSON"] {
        let (status, _) = raw_upgrade(
            node.client_addr(),
            "/ws",
            &[("Sec-WebSocket-Protocol", offer)],
        )
        .await?;
        ensure!(status == 400, "offer {offer:?}: expected 400, got {status}");
    }
    // The node is unaffected.
    let mut ws = node.ws().await?;
    ws.assert_alive().await?;
    ws.close().await
}

#[tokio::test]
async fn first_known_subprotocol_wins() -> Result<()> {
    let node = Node::start(&[]).await?;
    for (offer, chosen) in [
        ("chat, herald.v1.msgpack, herald.v1.json", MSGPACK),
        ("herald.v1.json, herald.v1.msgpack", "herald.v1.json"),
        ("x, herald.v1.json, herald.v1.msgpack", "herald.v1.json"),
    ] {
        let (status, headers) = raw_upgrade(
            node.client_addr(),
            "/ws",
            &[("Sec-WebSocket-Protocol", offer)],
        )
        .await?;
        ensure!(status == 101, "offer {offer:?}: got {status}");
        let got = header(&headers, "sec-websocket-protocol");
        ensure!(got == Some(chosen), "offer {offer:?}: chose {got:?}");
    }
    // Offered as separate header lines, too.
    let mut ws = node
        .ws_connect()
        .subprotocol("chat")
        .subprotocol(MSGPACK)
        .subprotocol("herald.v1.json")
        .connect()
        .await?;
    ensure!(ws.codec() == Codec::Msgpack);
    ws.assert_alive().await?;
    ws.close().await
}

#[tokio::test]
async fn binary_frame_on_json_session_is_bad_request() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws().await?;
    ws.send_binary(br#"{"op":"ping","id":1}"#).await?;
    ws.expect_err(None, "bad_request").await?;
    ws.assert_alive().await?;
    ws.close().await
}

#[tokio::test]
async fn text_frame_on_msgpack_session_is_bad_request() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws_msgpack().await?;
    ws.send_raw_text(r#"{"op":"ping","id":1}"#).await?;
    ws.expect_err(None, "bad_request").await?;
    ws.assert_alive().await?;
    ws.close().await
}

#[tokio::test]
async fn ids_are_echoed_exactly() -> Result<()> {
    let node = Node::start(&[]).await?;
    for mut ws in [node.ws().await?, node.ws_msgpack().await?] {
        for id in [0, 1, 4_294_967_296, u64::MAX - 1, u64::MAX] {
            ws.send_json(json!({"op": "ping", "id": id})).await?;
            ws.expect_pong(id).await?;
            ws.send_json(json!({"op": "sub", "id": id, "topic": "ids.t"}))
                .await?;
            ws.expect_ok(id).await?;
            ws.send_json(json!({"op": "unsub", "id": id, "topic": "ids.t"}))
                .await?;
            ws.expect_ok(id).await?;
        }
        ws.close().await?;
    }
    // The exact text, not just the value after a float round trip.
    let mut ws = node.ws().await?;
    ws.send_raw_text(r#"{"op":"ping","id":18446744073709551615}"#)
        .await?;
    ws.expect_pong(u64::MAX).await?;
    ws.close().await
}

#[tokio::test]
async fn id_of_a_pub_is_echoed_with_seq() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws().await?;
    ws.send_json(json!({"op": "pub", "id": 0, "topic": "ids.pub", "data": 1}))
        .await?;
    let ok = ws.expect_ok(0).await?;
    ensure!(ok["seq"] == 1, "{ok}");
    ws.send_json(json!({"op": "pub", "id": u64::MAX, "topic": "ids.pub", "data": 2}))
        .await?;
    let ok = ws.expect_ok(u64::MAX).await?;
    ensure!(ok["seq"] == 2, "{ok}");
    ws.close().await
}

#[tokio::test]
async fn missing_or_bad_ids_get_err_with_null_id() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws().await?;
    let cases = [
        r#"{"op":"ping"}"#,
        r#"{"op":"sub","topic":"a"}"#,
        r#"{"op":"unsub","topic":"a"}"#,
        r#"{"op":"ping","id":-1}"#,
        r#"{"op":"ping","id":1.5}"#,
        r#"{"op":"ping","id":"7"}"#,
        r#"{"op":"ping","id":null}"#,
        r#"{"op":"ping","id":18446744073709551616}"#,
        r#"{"op":"sub","id":true,"topic":"a"}"#,
        r#"{"op":"pub","id":-5,"topic":"a","data":1}"#,
    ];
    for case in cases {
        ws.send_raw_text(case).await?;
        let v = ws.recv().await?;
        check_err(&v, None, "bad_request").map_err(|e| e.context(format!("sent {case}")))?;
        ws.assert_alive().await?;
    }
    // A rejected sub subscribed nothing.
    ws.publish("a", json!(1)).await?;
    ws.expect_nothing(QUIET).await?;
    ws.close().await
}

#[tokio::test]
async fn msgpack_bad_ids_get_err_with_null_id() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws_msgpack().await?;
    for id in [json!(-1), json!("7"), json!(2.5)] {
        ws.send_json(json!({"op": "ping", "id": id})).await?;
        ws.expect_err(None, "bad_request").await?;
        ws.assert_alive().await?;
    }
    ws.send_json(json!({"op": "ping"})).await?;
    ws.expect_err(None, "bad_request").await?;
    // Not MessagePack at all, and a map with a non-string key.
    ws.send_binary(&[0xc1, 0xff, 0x00]).await?;
    ws.expect_err(None, "bad_request").await?;
    let bad_key = rmpv::Value::Map(vec![(rmpv::Value::from(1), rmpv::Value::from("ping"))]);
    ws.send_mp(&bad_key).await?;
    ws.expect_err(None, "bad_request").await?;
    ws.assert_alive().await?;
    ws.close().await
}

#[tokio::test]
async fn malformed_json_is_bad_request() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws().await?;
    for case in [
        "{not json",
        "",
        "[1,2",
        "42",
        "\"ping\"",
        "null",
        "{\"op\":\"ping\",\"id\":1",
        "[1]",
        "{\"op\":7,\"id\":1}",
    ] {
        ws.send_raw_text(case).await?;
        let v = ws.recv().await?;
        ensure!(
            v["op"] == "err" && v["code"] == "bad_request" && v["message"].is_string(),
            "sent {case:?}, got {v}"
        );
        ws.assert_alive().await?;
    }
    ws.close().await
}

#[tokio::test]
async fn unknown_or_missing_op_is_bad_request() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws().await?;
    for case in [
        json!({"op": "frobnicate", "id": 5}),
        json!({"op": "PING", "id": 5}),
        json!({"id": 5}),
    ] {
        ws.send_json(case.clone()).await?;
        let v = ws.recv().await?;
        // The contract does not say whether a well-formed id is echoed here.
        ensure!(
            v["op"] == "err"
                && v["code"] == "bad_request"
                && (v["id"] == 5 || v["id"].is_null())
                && v.get("id").is_some(),
            "sent {case}, got {v}"
        );
        ws.assert_alive().await?;
    }
    ws.close().await
}

#[tokio::test]
async fn array_frames_are_handled_element_by_element() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws().await?;
    ws.send_json(json!([
        {"op": "ping", "id": 1},
        {"op": "ping"},
        {"op": "sub", "id": 2, "topic": "bad..topic"},
        {"op": "sub", "id": 3, "topic": "arr.t"},
        {"op": "pub", "topic": "arr.t", "data": "unacked"},
        {"op": "pub", "id": 4, "topic": "arr.t"},
        {"op": "pub", "id": 5, "topic": "arr.t", "data": "acked"},
        {"op": "ping", "id": 6},
    ]))
    .await?;
    // One reply per element that asks for one, matched by id (docs/protocol.md:
    // replies that wait on a topic's owner may overtake or be overtaken by
    // immediate ones); the msgs of the two good pubs come after the sub's ok.
    let mut replies = Vec::new();
    let mut msgs = Vec::new();
    let mut sub_ok_seen_before_msgs = true;
    while replies.len() < 7 || msgs.len() < 2 {
        let v = ws.recv().await?;
        if v["op"] == "msg" {
            if !replies.iter().any(|r: &serde_json::Value| r["id"] == 3) {
                sub_ok_seen_before_msgs = false;
            }
            msgs.push(v);
        } else {
            replies.push(v);
        }
    }
    ensure!(sub_ok_seen_before_msgs, "a msg came before the sub's ok");
    let by_id = |id: serde_json::Value| {
        replies
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no reply with id {id}: {replies:?}"))
    };
    ensure!(by_id(json!(1))?["op"] == "pong", "{replies:?}");
    check_err(&by_id(json!(null))?, None, "bad_request")?;
    check_err(&by_id(json!(2))?, Some(2), "bad_request")?;
    ensure!(by_id(json!(3))?["op"] == "ok", "{replies:?}");
    check_err(&by_id(json!(4))?, Some(4), "bad_request")?;
    let acked = by_id(json!(5))?;
    ensure!(acked["op"] == "ok" && acked["seq"] == 2, "{replies:?}");
    ensure!(by_id(json!(6))?["op"] == "pong", "{replies:?}");
    ensure!(
        msgs[0]["data"] == "unacked" && msgs[0]["seq"] == 1,
        "{msgs:?}"
    );
    ensure!(
        msgs[1]["data"] == "acked" && msgs[1]["seq"] == 2,
        "{msgs:?}"
    );
    ws.expect_nothing(QUIET).await?;
    ws.close().await
}

#[tokio::test]
async fn msgpack_array_frames_are_handled() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws_msgpack().await?;
    ws.send_json(json!([
        {"op": "ping", "id": 1},
        {"op": "nope", "id": 2},
        {"op": "ping", "id": 3},
    ]))
    .await?;
    ws.expect_pong(1).await?;
    let v = ws.recv().await?;
    ensure!(v["op"] == "err" && v["code"] == "bad_request", "{v}");
    ws.expect_pong(3).await?;
    ws.close().await
}

#[tokio::test]
async fn msgpack_round_trip() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut sub = node.ws_msgpack().await?;
    let ok = sub.sub("mp.rt").await?;
    ensure!(ok["seq"] == 0 && ok["epoch"].is_string(), "{ok}");
    ensure!(ok.get("recovered").is_none(), "{ok}");
    let mut publisher = node.ws_msgpack().await?;
    let data = json!({"a": [1, -2, 3.5, true, null], "b": {"c": "d"}, "big": u64::MAX});
    let (seq, _) = publisher.publish("mp.rt", data.clone()).await?;
    ensure!(seq == 1);
    let msg = sub.expect_msg("mp.rt", &data).await?;
    ensure!(msg["seq"] == 1 && msg.get("b64").is_none(), "{msg}");
    sub.close().await?;
    publisher.close().await
}

#[tokio::test]
async fn msgpack_binary_data_reaches_json_as_base64() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut json_sub = node.ws().await?;
    json_sub.sub("bin.t").await?;
    let mut mp_sub = node.ws_msgpack().await?;
    mp_sub.sub("bin.t").await?;
    let mut publisher = node.ws_msgpack().await?;
    let bytes: Vec<u8> = vec![0, 1, 2, 0xfe, 0xff, b'a'];
    let pub_msg = rmpv::Value::Map(vec![
        ("op".into(), "pub".into()),
        ("id".into(), 9.into()),
        ("topic".into(), "bin.t".into()),
        ("data".into(), rmpv::Value::Binary(bytes.clone())),
    ]);
    publisher.send_mp(&pub_msg).await?;
    publisher.expect_ok(9).await?;
    let msg = json_sub
        .expect_msg("bin.t", &json!(cluster_tests::b64(&bytes)))
        .await?;
    ensure!(
        msg["b64"] == true,
        "json client got binary data without b64: {msg}"
    );
    let msg = mp_sub.expect_msg("bin.t", &mp_bin(&bytes)).await?;
    ensure!(msg.get("b64").is_none(), "{msg}");
    // A json string is a msgpack str (not bin), and has no b64 flag.
    publisher.publish("bin.t", json!("AAEC")).await?;
    let msg = json_sub.expect_msg("bin.t", &json!("AAEC")).await?;
    ensure!(msg.get("b64").is_none() || msg["b64"] == false, "{msg}");
    mp_sub.expect_msg("bin.t", &json!("AAEC")).await?;
    // Padding: lengths 1 and 2 mod 3.
    for len in [1usize, 2, 4] {
        let bytes = vec![0xabu8; len];
        let pub_msg = rmpv::Value::Map(vec![
            ("op".into(), "pub".into()),
            ("topic".into(), "bin.t".into()),
            ("data".into(), rmpv::Value::Binary(bytes.clone())),
        ]);
        publisher.send_mp(&pub_msg).await?;
        let msg = json_sub.recv().await?;
        ensure!(
            msg["data"] == json!(cluster_tests::b64(&bytes)) && msg["b64"] == true,
            "len {len}: {msg}"
        );
    }
    for ws in [json_sub, mp_sub, publisher] {
        ws.close().await?;
    }
    Ok(())
}

#[tokio::test]
async fn msgpack_and_json_sessions_share_topics() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut mp = node.ws_msgpack().await?;
    mp.sub("mix.t").await?;
    let mut js = node.ws().await?;
    let data = json!({"text": "héllo", "n": [1, 2, 3]});
    js.publish("mix.t", data.clone()).await?;
    let msg: Value = mp.expect_msg("mix.t", &data).await?;
    ensure!(msg["seq"] == 1);
    mp.close().await?;
    js.close().await
}
