//! Subscribing, publishing and unsubscribing: topic syntax, `*` and `>`
//! patterns, `data` rules, once-per-session delivery, own publishes, and
//! queue groups.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{ensure, Result};
use cluster_tests::{Node, WsClient, QUIET};
use serde_json::{json, Value};

async fn node_and_session() -> Result<(Node, WsClient)> {
    let node = Node::start(&[]).await?;
    let ws = node.ws().await?;
    Ok((node, ws))
}

#[tokio::test]
async fn sub_then_pub_delivers_a_msg() -> Result<()> {
    let (node, mut sub) = node_and_session().await?;
    let ok = sub.sub("news.sport").await?;
    ensure!(
        ok["seq"] == 0,
        "exact sub on an empty topic has seq 0: {ok}"
    );
    let epoch = ok["epoch"].as_str().unwrap_or_default().to_owned();
    ensure!(!epoch.is_empty(), "exact sub has an epoch: {ok}");
    ensure!(
        ok.get("recovered").is_none(),
        "recovered without since: {ok}"
    );
    let mut publisher = node.ws().await?;
    let (seq, pub_epoch) = publisher.publish("news.sport", json!({"score": 3})).await?;
    ensure!(
        seq == 1 && pub_epoch == epoch,
        "ok to pub: seq {seq} epoch {pub_epoch}"
    );
    let msg = sub.expect_msg("news.sport", &json!({"score": 3})).await?;
    ensure!(msg["seq"] == 1, "{msg}");
    ensure!(
        msg.get("trace").is_none() || msg["trace"].is_string(),
        "{msg}"
    );
    // A pub without id gets no reply.
    publisher.publish_unacked("news.sport", json!(2)).await?;
    publisher.expect_nothing(QUIET).await?;
    sub.expect_msg("news.sport", &json!(2)).await?;
    sub.close().await?;
    publisher.close().await
}

#[tokio::test]
async fn every_json_value_is_data_and_null_is_allowed() -> Result<()> {
    let (_node, mut ws) = node_and_session().await?;
    ws.sub("data.t").await?;
    let values = [
        json!(null),
        json!(false),
        json!(0),
        json!(-17),
        json!(1.25),
        json!(u64::MAX),
        json!(""),
        json!("text with \"quotes\" and ünïcode ✓"),
        json!([]),
        json!([1, "two", null, {"x": []}]),
        json!({}),
        json!({"nested": {"deep": [true]}}),
    ];
    for data in &values {
        ws.send_json(json!({"op": "pub", "id": 1, "topic": "data.t", "data": data}))
            .await?;
        // Own publish: the msg and the ok, in either order.
        let both = ws.recv_n(2).await?;
        let msg = both.iter().find(|v| v["op"] == "msg");
        let ok = both.iter().find(|v| v["op"] == "ok");
        ensure!(ok.is_some_and(|ok| ok["id"] == 1), "{both:?}");
        ensure!(
            msg.is_some_and(|m| m.get("data") == Some(data) && m["topic"] == "data.t"),
            "data {data}: {both:?}"
        );
    }
    ws.close().await
}

#[tokio::test]
async fn missing_data_is_bad_request() -> Result<()> {
    let (_node, mut ws) = node_and_session().await?;
    ws.sub("data.t").await?;
    ws.send_json(json!({"op": "pub", "id": 3, "topic": "data.t"}))
        .await?;
    ws.expect_err(Some(3), "bad_request").await?;
    ws.send_json(json!({"op": "pub", "topic": "data.t"}))
        .await?;
    let v = ws.recv().await?;
    ensure!(v["op"] == "err" && v["code"] == "bad_request", "{v}");
    ws.expect_nothing(QUIET).await?;
    // Nothing was sequenced: the next message is seq 1.
    let (seq, _) = ws.publish_and_collect("data.t", json!(1)).await?;
    ensure!(seq == 1, "a rejected pub was sequenced: next seq {seq}");
    ws.close().await
}

#[tokio::test]
async fn json_data_msgpack_subscribers_could_not_get_is_bad_request() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut mp_sub = node.ws_msgpack().await?;
    mp_sub.sub("data.x").await?;
    let mut publisher = node.ws().await?;
    let too_deep = "[".repeat(128) + &"]".repeat(128);
    for (id, data) in [
        (1, "1e400"),
        (2, r#"{"k":"\ud800"}"#),
        (3, too_deep.as_str()),
    ] {
        publisher
            .send_raw_text(&format!(
                r#"{{"op":"pub","id":{id},"topic":"data.x","data":{data}}}"#
            ))
            .await?;
        let err = publisher.expect_err(Some(id), "bad_request").await?;
        ensure!(
            err["message"]
                .as_str()
                .is_some_and(|m| m.contains("`data`")),
            "{err}"
        );
    }
    // Nothing was sequenced, and the session goes on.
    let (seq, _) = publisher.publish("data.x", json!({"n": 1e300})).await?;
    ensure!(seq == 1, "a refused pub was sequenced: seq {seq}");
    mp_sub.expect_msg("data.x", &json!({"n": 1e300})).await?;
    mp_sub.expect_nothing(QUIET).await?;
    mp_sub.close().await?;
    publisher.close().await
}

/// Publishing to yourself: the ok and the msg may come in either order.
trait OwnPublish {
    async fn publish_and_collect(&mut self, topic: &str, data: Value) -> Result<(u64, Value)>;
}

impl OwnPublish for WsClient {
    async fn publish_and_collect(&mut self, topic: &str, data: Value) -> Result<(u64, Value)> {
        let id = self.fresh_id();
        self.send_json(json!({"op": "pub", "id": id, "topic": topic, "data": data}))
            .await?;
        let both = self.recv_n(2).await?;
        let ok = both
            .iter()
            .find(|v| v["op"] == "ok" && v["id"] == id)
            .cloned();
        let msg = both.iter().find(|v| v["op"] == "msg").cloned();
        match (ok, msg) {
            (Some(ok), Some(msg)) => {
                ensure!(ok["seq"] == msg["seq"], "ok and msg disagree: {both:?}");
                Ok((ok["seq"].as_u64().unwrap_or_default(), msg))
            }
            _ => anyhow::bail!("expected an ok and a msg, got {both:?}"),
        }
    }
}

#[tokio::test]
async fn a_session_receives_its_own_publishes() -> Result<()> {
    let (_node, mut ws) = node_and_session().await?;
    ws.sub("self.t").await?;
    let (seq, msg) = ws.publish_and_collect("self.t", json!("me")).await?;
    ensure!(seq == 1 && msg["data"] == "me", "{msg}");
    ws.publish_unacked("self.t", json!("again")).await?;
    ws.expect_msg("self.t", &json!("again")).await?;
    ws.close().await
}

#[tokio::test]
async fn publishing_to_a_pattern_is_bad_request() -> Result<()> {
    let (_node, mut ws) = node_and_session().await?;
    ws.sub(">").await?;
    for topic in ["news.*", "news.>", "*", ">", "a.*.b"] {
        ws.send_json(json!({"op": "pub", "id": 8, "topic": topic, "data": 1}))
            .await?;
        ws.expect_err(Some(8), "bad_request").await?;
    }
    ws.expect_nothing(QUIET).await?;
    ws.assert_alive().await?;
    ws.close().await
}

#[tokio::test]
async fn bad_topics_are_rejected() -> Result<()> {
    let (_node, mut ws) = node_and_session().await?;
    let bad = [
        "", ".", "a..b", ".a", "a.", "a b", "a/b", "a,b", "é", "a\u{0}b", "a.b*", "a*.b", "a.>.b",
        ">.a", "a.b>", "a.>>", "a.**",
    ];
    for topic in bad {
        for op in ["sub", "unsub"] {
            ws.send_json(json!({"op": op, "id": 11, "topic": topic}))
                .await?;
            ws.expect_err(Some(11), "bad_request")
                .await
                .map_err(|e| e.context(format!("{op} {topic:?}")))?;
        }
        ws.send_json(json!({"op": "pub", "id": 12, "topic": topic, "data": 1}))
            .await?;
        ws.expect_err(Some(12), "bad_request")
            .await
            .map_err(|e| e.context(format!("pub {topic:?}")))?;
    }
    // A topic that is not a string at all.
    ws.send_json(json!({"op": "sub", "id": 13, "topic": 5}))
        .await?;
    ws.expect_err(Some(13), "bad_request").await?;
    ws.send_json(json!({"op": "sub", "id": 14})).await?;
    ws.expect_err(Some(14), "bad_request").await?;
    ws.assert_alive().await?;
    ws.close().await
}

#[tokio::test]
async fn every_allowed_character_makes_a_topic() -> Result<()> {
    let (_node, mut ws) = node_and_session().await?;
    let topic = "ABCXYZ.abcxyz.0189._-:.a:b-c_d";
    ws.sub(topic).await?;
    let (seq, msg) = ws.publish_and_collect(topic, json!(1)).await?;
    ensure!(seq == 1 && msg["topic"] == topic, "{msg}");
    ws.close().await
}

#[tokio::test]
async fn topics_over_255_bytes_are_limit_exceeded() -> Result<()> {
    let (_node, mut ws) = node_and_session().await?;
    let max = format!("{}.{}", "a".repeat(127), "b".repeat(127));
    assert_eq!(max.len(), 255);
    let over = format!("{max}c");
    ws.sub(&max).await?;
    let (seq, _) = ws.publish_and_collect(&max, json!("fits")).await?;
    ensure!(seq == 1);
    for op in ["sub", "unsub"] {
        ws.send_json(json!({"op": op, "id": 21, "topic": over}))
            .await?;
        ws.expect_err(Some(21), "limit_exceeded").await?;
    }
    ws.send_json(json!({"op": "pub", "id": 22, "topic": over, "data": 1}))
        .await?;
    ws.expect_err(Some(22), "limit_exceeded").await?;
    // A pattern over 255 bytes too.
    let long_pattern = format!("{}.>", "p".repeat(254));
    ws.send_json(json!({"op": "sub", "id": 23, "topic": long_pattern}))
        .await?;
    ws.expect_err(Some(23), "limit_exceeded").await?;
    ws.assert_alive().await?;
    ws.close().await
}

/// Publishes each topic (acked) from `publisher` and returns the topics
/// `sub` received, in order, once the flow is quiet.
async fn received_topics(
    publisher: &mut WsClient,
    sub: &mut WsClient,
    topics: &[&str],
) -> Result<Vec<String>> {
    for topic in topics {
        publisher.publish(topic, json!(topic)).await?;
    }
    let got = sub.drain(QUIET, Duration::from_secs(5)).await?;
    got.iter()
        .map(|v| {
            ensure!(v["op"] == "msg" && v["data"] == v["topic"], "{v}");
            Ok(v["topic"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn star_matches_exactly_one_token() -> Result<()> {
    let (node, mut sub) = node_and_session().await?;
    let ok = sub.sub("news.*").await?;
    ensure!(ok.get("recovered").is_none(), "{ok}");
    sub.sub("*.x.*").await?;
    let mut publisher = node.ws().await?;
    let got = received_topics(
        &mut publisher,
        &mut sub,
        &[
            "news", "news.a", "news.a.b", "sport.a", "xnews.a", "a.x.b", "a.x", "a.x.b.c",
            "news.x.y",
        ],
    )
    .await?;
    ensure!(
        got == ["news.a", "a.x.b", "news.x.y"],
        "news.* and *.x.* received {got:?}"
    );
    publisher.close().await?;
    sub.close().await
}

#[tokio::test]
async fn gt_matches_one_or_more_trailing_tokens() -> Result<()> {
    let (node, mut sub) = node_and_session().await?;
    sub.sub("news.>").await?;
    let mut all = node.ws().await?;
    all.sub(">").await?;
    let mut publisher = node.ws().await?;
    let topics = ["news", "news.a", "news.a.b.c", "other.news.a", "newsx.a"];
    let got = received_topics(&mut publisher, &mut sub, &topics).await?;
    ensure!(got == ["news.a", "news.a.b.c"], "news.> received {got:?}");
    let everything = all.drain(QUIET, Duration::from_secs(5)).await?;
    let everything: Vec<&str> = everything
        .iter()
        .map(|v| v["topic"].as_str().unwrap_or_default())
        .collect();
    ensure!(everything == topics, "> received {everything:?}");
    for ws in [sub, all, publisher] {
        ws.close().await?;
    }
    Ok(())
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once() -> Result<()> {
    let (node, mut sub) = node_and_session().await?;
    for pattern in ["a.b.c", "a.*.c", "a.>", "*.b.*", ">", "a.b.>"] {
        sub.sub(pattern).await?;
    }
    let mut publisher = node.ws().await?;
    publisher.publish("a.b.c", json!(1)).await?;
    publisher.publish("a.b.c", json!(2)).await?;
    sub.expect_msg("a.b.c", &json!(1)).await?;
    sub.expect_msg("a.b.c", &json!(2)).await?;
    sub.expect_nothing(QUIET).await?;
    // Dropping some of the matching subscriptions still leaves one copy.
    sub.unsub("a.b.c").await?;
    sub.unsub(">").await?;
    publisher.publish("a.b.c", json!(3)).await?;
    sub.expect_msg("a.b.c", &json!(3)).await?;
    sub.expect_nothing(QUIET).await?;
    sub.close().await?;
    publisher.close().await
}

#[tokio::test]
async fn unsub_stops_delivery_and_unknown_unsub_is_ok() -> Result<()> {
    let (node, mut sub) = node_and_session().await?;
    sub.sub("u.t").await?;
    sub.sub("u.*").await?;
    let mut publisher = node.ws().await?;
    // Unsubscribing what was never subscribed is ok, and changes nothing.
    sub.unsub("never.subscribed").await?;
    sub.unsub("u.>").await?;
    sub.send_json(json!({"op": "unsub", "id": 40, "topic": "u.t", "group": "g"}))
        .await?;
    sub.expect_ok(40).await?;
    publisher.publish("u.t", json!(1)).await?;
    sub.expect_msg("u.t", &json!(1)).await?;
    sub.unsub("u.t").await?;
    publisher.publish("u.t", json!(2)).await?;
    sub.expect_msg("u.t", &json!(2)).await?; // still matched by u.*
    sub.unsub("u.*").await?;
    publisher.publish("u.t", json!(3)).await?;
    sub.expect_nothing(QUIET).await?;
    // Twice is fine.
    sub.unsub("u.*").await?;
    // Resubscribing works again.
    sub.sub("u.t").await?;
    publisher.publish("u.t", json!(4)).await?;
    let msg = sub.expect_msg("u.t", &json!(4)).await?;
    ensure!(msg["seq"] == 4, "{msg}");
    sub.close().await?;
    publisher.close().await
}

#[tokio::test]
async fn queue_group_shares_messages() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut g1 = Vec::new();
    for _ in 0..3 {
        let mut ws = node.ws().await?;
        ws.sub_group("jobs.run", "workers").await?;
        g1.push(ws);
    }
    let mut g2 = Vec::new();
    for _ in 0..2 {
        let mut ws = node.ws().await?;
        ws.sub_group("jobs.run", "auditors").await?;
        g2.push(ws);
    }
    let mut plain = node.ws().await?;
    plain.sub("jobs.run").await?;
    let mut publisher = node.ws().await?;
    const N: u64 = 60;
    for i in 0..N {
        publisher.publish("jobs.run", json!(i)).await?;
    }
    // The plain subscriber gets every message, in order.
    for i in 0..N {
        let msg = plain.expect_msg("jobs.run", &json!(i)).await?;
        ensure!(msg["seq"] == i + 1, "{msg}");
    }
    plain.expect_nothing(QUIET).await?;
    for (name, group) in [("workers", &mut g1), ("auditors", &mut g2)] {
        let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
        let mut per_member = Vec::new();
        for member in group.iter_mut() {
            let got = member.drain(QUIET, Duration::from_secs(5)).await?;
            let mut last = 0;
            for v in &got {
                let seq = v["seq"].as_u64().unwrap_or_default();
                ensure!(v["op"] == "msg" && seq > last, "member order: {v}");
                last = seq;
                *seen.entry(seq).or_default() += 1;
            }
            per_member.push(got.len());
        }
        let expected: BTreeMap<u64, usize> = (1..=N).map(|s| (s, 1)).collect();
        ensure!(
            seen == expected,
            "group {name}: each message to exactly one member; counts per seq {seen:?}"
        );
        ensure!(
            per_member.iter().filter(|&&n| n > 0).count() >= 2,
            "group {name}: messages were not shared at all: {per_member:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_group_is_keyed_by_pattern_and_name() -> Result<()> {
    let node = Node::start(&[]).await?;
    // Same group name, different patterns: two groups, each gets everything.
    let mut exact = node.ws().await?;
    exact.sub_group("keyed.a", "g").await?;
    let mut wild = node.ws().await?;
    wild.sub_group("keyed.*", "g").await?;
    // Same pattern, different name: another group.
    let mut other = node.ws().await?;
    other.sub_group("keyed.a", "h").await?;
    let mut publisher = node.ws().await?;
    for i in 0..5 {
        publisher.publish("keyed.a", json!(i)).await?;
    }
    for ws in [&mut exact, &mut wild, &mut other] {
        for i in 0..5 {
            ws.expect_msg("keyed.a", &json!(i)).await?;
        }
        ws.expect_nothing(QUIET).await?;
    }
    // unsub names the group: unsub without it leaves the group member.
    exact.unsub("keyed.a").await?;
    publisher.publish("keyed.a", json!(5)).await?;
    exact.expect_msg("keyed.a", &json!(5)).await?;
    exact
        .send_json(json!({"op": "unsub", "id": 50, "topic": "keyed.a", "group": "g"}))
        .await?;
    exact.expect_ok(50).await?;
    publisher.publish("keyed.a", json!(6)).await?;
    exact.expect_nothing(QUIET).await?;
    Ok(())
}

#[tokio::test]
async fn group_member_and_plain_subscription_in_one_session() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut both = node.ws().await?;
    both.sub("mixed.t").await?;
    both.sub_group("mixed.t", "g").await?;
    let mut publisher = node.ws().await?;
    for i in 0..3 {
        publisher.publish("mixed.t", json!(i)).await?;
    }
    // Each message once, although two subscriptions match.
    let got = both.drain(QUIET, Duration::from_secs(5)).await?;
    let seqs: BTreeSet<u64> = got.iter().filter_map(|v| v["seq"].as_u64()).collect();
    ensure!(got.len() == 3 && seqs.len() == 3, "{got:?}");
    Ok(())
}
