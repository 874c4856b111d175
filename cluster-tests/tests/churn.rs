//! Sessions that come and go, cleanly and badly, across a 3-node cluster
//! leave nothing behind.
//!
//! Each round, on every node: sessions in both codecs subscribe (exact
//! topics owned all over the ring, wildcards, queue groups, a replay with
//! `since`), publish, send bad input (malformed frames, bad topics, data
//! MessagePack cannot carry, a frame over the size limit, a bad HTTP body),
//! and leave every way a client can: `unsub` then a clean close, a dropped
//! TCP connection, a connection dropped right after its `sub`s were sent.
//! Meanwhile a steady subscriber on every node shares a topic with the
//! churning sessions and must get every message of a steady publisher, in
//! order. Afterwards every node's sessions, subscriptions, routing tables
//! (`herald_table_entries{table}`) and runtime tasks
//! (`herald_runtime_alive_tasks`) must come back to where they started.
//!
//! A session its node closes as a slow consumer (4001) leaves nothing
//! behind either.
//!
//! And when a node dies and comes back, topics move away from it and back:
//! the owners then hold exactly one interest entry per node and topic with
//! subscribers, none left behind by an owner that held the topic meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cluster_tests::{Cluster, Metrics, Node, WsClient};
use serde_json::{json, Value};

/// Rounds of churn: bounded, and enough that a leak of one task or table
/// entry per session stands far above the slack below.
const ROUNDS: u64 = 25;
/// Runtime tasks a node may hold above its idle count when the churn is
/// over (timers and connections of the scrape itself come and go). Each
/// round opens 4 sessions on each node, so a leak of one task per session is
/// 100 per node.
const TASK_SLACK: f64 = 8.0;
/// How long the nodes may take to let go of everything (tables are
/// refreshed on `/metrics` every second).
const SETTLE: Duration = Duration::from_secs(15);
/// What the steady subscribers share with the churning sessions.
const STEADY: &str = "steady.shared";
const MAX_MESSAGE_BYTES: usize = 4096;

#[tokio::test]
async fn sessions_that_come_and_go_leave_nothing_behind() -> Result<()> {
    let cluster = Cluster::start(3, |b| {
        b.flag("--client-max-message-bytes", &MAX_MESSAGE_BYTES.to_string())
    })
    .await?;
    let nodes: Vec<&Node> = cluster.live().collect();
    let idle = idle_tasks(&nodes).await?;

    let mut steady = Vec::new();
    for node in &nodes {
        let mut ws = node.ws().await?;
        ws.sub(STEADY).await?;
        steady.push(ws);
    }
    let mut steady_publisher = nodes[0].ws().await?;

    for round in 0..ROUNDS {
        for (i, node) in nodes.iter().enumerate() {
            churn_once(node, round, i)
                .await
                .with_context(|| format!("round {round} on {}", node.id()))?;
        }
        steady_publisher.publish(STEADY, json!(round)).await?;
    }

    // Every steady subscriber got every round's message, in order, and
    // nothing else it did not ask for.
    for (ws, node) in steady.iter_mut().zip(&nodes) {
        let mut got = Vec::new();
        while got.len() < ROUNDS as usize {
            let v = ws
                .recv()
                .await
                .with_context(|| format!("steady subscriber on {}: got {got:?}", node.id()))?;
            ensure!(
                v["op"] == "msg" && v["topic"] == STEADY,
                "{}: {v}",
                node.id()
            );
            got.push(v["data"].clone());
        }
        let want: Vec<Value> = (0..ROUNDS).map(|r| json!(r)).collect();
        ensure!(got == want, "steady subscriber on {}: {got:?}", node.id());
    }
    // The tables are refreshed once a second: wait until every node's
    // shows its steady subscriber, so that the zeros awaited below come
    // from a count made after everything above.
    for node in &nodes {
        settled(node, |m| {
            m.labeled("herald_table_entries", "table", "local") >= 1.0
        })
        .await
        .with_context(|| format!("{}: the steady subscriber is not counted", node.id()))?;
    }
    for ws in steady {
        ws.close().await?;
    }
    steady_publisher.close().await?;

    back_to_idle(&nodes, &idle, TASK_SLACK).await?;

    // And the cluster still delivers between every node.
    let mut late = nodes[2].ws().await?;
    late.sub("after.churn").await?;
    let mut publisher = nodes[1].ws().await?;
    publisher
        .publish("after.churn", json!("still here"))
        .await?;
    late.expect_msg("after.churn", &json!("still here")).await?;
    Ok(())
}

/// One round of sessions on `node`, each ending differently.
async fn churn_once(node: &Node, round: u64, i: usize) -> Result<()> {
    let tag = format!("r{round}n{i}");
    // Exact topics whose owners are spread over the ring, a wildcard, a
    // queue group, and the steady subscribers' topic with a replay.
    let exact: Vec<String> = (0..6).map(|k| format!("{k}.{tag}.churn")).collect();

    // A json session that does everything, then unsubscribes part and
    // closes cleanly.
    let mut tidy = node.ws().await?;
    let mut ids = Vec::new();
    for topic in &exact {
        ids.push(send(&mut tidy, json!({"op": "sub", "topic": topic})).await?);
    }
    ids.push(send(&mut tidy, json!({"op": "sub", "topic": "*.churn.wild"})).await?);
    ids.push(
        send(
            &mut tidy,
            json!({"op": "sub", "topic": "jobs.churn", "group": "g"}),
        )
        .await?,
    );
    ids.push(send(&mut tidy, json!({"op": "sub", "topic": STEADY, "since": 0})).await?);
    for topic in &exact {
        ids.push(
            send(
                &mut tidy,
                json!({"op": "pub", "topic": topic, "data": round}),
            )
            .await?,
        );
    }
    ids.push(
        send(
            &mut tidy,
            json!({"op": "pub", "topic": "jobs.churn", "data": 1}),
        )
        .await?,
    );
    ids.push(
        send(
            &mut tidy,
            json!({"op": "pub", "topic": "x.churn.wild", "data": 2}),
        )
        .await?,
    );
    let answers = replies(&mut tidy, &ids).await?;
    ensure!(
        answers.values().all(|v| v["op"] == "ok"),
        "every request was valid: {answers:?}"
    );
    // Bad input, each answered alone: the session goes on.
    let bad = [
        json!({"op": "pub", "topic": "a.*", "data": 1}),
        json!({"op": "sub", "topic": "a..b"}),
        json!({"op": "nope"}),
        json!({"op": "unsub", "topic": "never.subscribed"}),
    ];
    let mut bad_ids = Vec::new();
    for request in bad {
        bad_ids.push(send(&mut tidy, request).await?);
    }
    let id = tidy.fresh_id();
    tidy.send_raw_text(&format!(
        r#"{{"op":"pub","id":{id},"topic":"{}","data":1e400}}"#,
        exact[0]
    ))
    .await?;
    bad_ids.push(id);
    tidy.send_raw_text("{not json").await?;
    let answered = replies(&mut tidy, &bad_ids).await?;
    ensure!(
        answered.values().filter(|v| v["op"] == "err").count() == 4,
        "four bad requests and one harmless unsub: {answered:?}"
    );
    let mut ids = Vec::new();
    for topic in exact.iter().take(3) {
        ids.push(send(&mut tidy, json!({"op": "unsub", "topic": topic})).await?);
    }
    replies(&mut tidy, &ids).await?;
    tidy.close().await?;

    // A msgpack session that subscribes and publishes, sends a text frame
    // (wrong for its codec), and then just drops its connection.
    let mut dropped = node.ws_msgpack().await?;
    let mut ids = Vec::new();
    for topic in exact.iter().skip(2) {
        ids.push(send(&mut dropped, json!({"op": "sub", "topic": topic})).await?);
    }
    ids.push(send(&mut dropped, json!({"op": "sub", "topic": "*.churn.wild"})).await?);
    ids.push(send(&mut dropped, json!({"op": "sub", "topic": STEADY})).await?);
    ids.push(
        send(
            &mut dropped,
            json!({"op": "sub", "topic": "jobs.churn", "group": "g"}),
        )
        .await?,
    );
    ids.push(
        send(
            &mut dropped,
            json!({"op": "pub", "topic": exact[5], "data": "mp"}),
        )
        .await?,
    );
    replies(&mut dropped, &ids).await?;
    dropped.send_raw_text(r#"{"op":"ping","id":1}"#).await?;
    drop(dropped);

    // A session gone before its subscriptions are answered.
    let mut hasty = node.ws().await?;
    for topic in &exact {
        send(&mut hasty, json!({"op": "sub", "topic": topic})).await?;
    }
    send(&mut hasty, json!({"op": "sub", "topic": "hasty.>"})).await?;
    send(
        &mut hasty,
        json!({"op": "sub", "topic": STEADY, "group": "h"}),
    )
    .await?;
    drop(hasty);

    // A frame over the size limit: the node closes the session (1009).
    let mut oversize = node.ws().await?;
    oversize.sub(&exact[1]).await?;
    let big = format!(
        r#"{{"op":"pub","topic":"{}","data":"{}"}}"#,
        exact[1],
        "x".repeat(MAX_MESSAGE_BYTES)
    );
    oversize.send_raw_text(&big).await?;
    oversize
        .expect_close(1009, Duration::from_secs(5))
        .await
        .context("a frame over the limit closes with 1009")?;

    // HTTP: a bad body and a good one.
    let resp = node
        .http_publish(&exact[0], Some("application/json"), b"[1,", &[])
        .await?;
    ensure!(resp.status == 400, "bad JSON body: {}", resp.status);
    let resp = node
        .http_publish(&exact[0], Some("application/json"), b"3", &[])
        .await?;
    ensure!(
        resp.status == 200,
        "good body: {} {}",
        resp.status,
        resp.text()
    );
    Ok(())
}

/// Sends `request` with a fresh `id`; returns the id.
async fn send(ws: &mut WsClient, mut request: Value) -> Result<u64> {
    let id = ws.fresh_id();
    request["id"] = json!(id);
    ws.send_json(request).await?;
    Ok(id)
}

/// Receives until every id in `ids` has its reply (`ok` or `err`),
/// skipping `msg`s and replies to no id; returns the replies by id.
async fn replies(ws: &mut WsClient, ids: &[u64]) -> Result<BTreeMap<u64, Value>> {
    let mut got = BTreeMap::new();
    while got.len() < ids.len() {
        let v = ws
            .recv()
            .await
            .with_context(|| format!("replies to {ids:?}: have {got:?}"))?;
        if let Some(id) = v["id"].as_u64().filter(|id| ids.contains(id)) {
            got.insert(id, v);
        }
    }
    Ok(got)
}

/// The node's tables hold nothing.
fn tables_empty(m: &Metrics) -> bool {
    ["interest", "local", "pending"]
        .iter()
        .all(|table| m.labeled("herald_table_entries", "table", table) == 0.0)
}

/// Each node's runtime tasks once it is idle (no connection, no table
/// entry): the count to come back to.
async fn idle_tasks(nodes: &[&Node]) -> Result<Vec<f64>> {
    let mut idle = Vec::new();
    for node in nodes {
        let m = settled(node, |m| {
            tables_empty(m) && m.sum("herald_connections") == 0.0
        })
        .await?;
        idle.push(tasks(&m)?);
    }
    Ok(idle)
}

/// Waits until every node holds no connection, subscription or table
/// entry, and at most `slack` runtime tasks above its idle count.
async fn back_to_idle(nodes: &[&Node], idle: &[f64], slack: f64) -> Result<()> {
    for (node, idle) in nodes.iter().zip(idle) {
        settled(node, |m| {
            tables_empty(m)
                && m.sum("herald_connections") == 0.0
                && m.sum("herald_subscriptions") == 0.0
                && m.sum("herald_runtime_alive_tasks") <= idle + slack
        })
        .await
        .with_context(|| format!("{} (idle: {idle} tasks)", node.id()))?;
    }
    Ok(())
}

fn tasks(m: &Metrics) -> Result<f64> {
    ensure!(
        m.has("herald_runtime_alive_tasks"),
        "/metrics has no herald_runtime_alive_tasks"
    );
    Ok(m.sum("herald_runtime_alive_tasks"))
}

/// Polls `/metrics` until `check` holds, for at most [`SETTLE`]; returns
/// that scrape, or fails showing the last one's figures.
async fn settled(node: &Node, check: impl Fn(&Metrics) -> bool) -> Result<Metrics> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let m = node.metrics().await?;
        if check(&m) {
            return Ok(m);
        }
        if Instant::now() > deadline {
            let show = |name: &str| m.sum(name);
            bail!(
                "not settled after {SETTLE:?}: connections {}, subscriptions {}, tables interest {} local {} pending {}, tasks {}",
                show("herald_connections"),
                show("herald_subscriptions"),
                m.labeled("herald_table_entries", "table", "interest"),
                m.labeled("herald_table_entries", "table", "local"),
                m.labeled("herald_table_entries", "table", "pending"),
                show("herald_runtime_alive_tasks"),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `interest` entries of every live node together.
async fn cluster_interest(cluster: &Cluster) -> Result<f64> {
    let mut sum = 0.0;
    for node in cluster.live() {
        sum += node
            .metrics()
            .await?
            .labeled("herald_table_entries", "table", "interest");
    }
    Ok(sum)
}

/// Waits until the cluster's `interest` entries are exactly `want`.
async fn wait_interest(cluster: &Cluster, want: f64, what: &str) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let sum = cluster_interest(cluster).await?;
        if sum == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: the cluster's interest entries are {sum}, not {want}, after {SETTLE:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A session on `node` subscribed to every topic of `topics`.
async fn subscribed_to(node: &Node, topics: &[String]) -> Result<WsClient> {
    let mut ws = node.ws().await?;
    for topic in topics {
        ws.sub(topic).await?;
    }
    Ok(ws)
}

#[tokio::test]
async fn after_a_node_dies_and_returns_owners_hold_exactly_the_live_interest() -> Result<()> {
    let mut cluster = Cluster::start(3, |b| b).await?;
    // Topics owned all over the ring; one (node, topic) entry on the
    // topic's owner for each node with a subscriber.
    let topics: Vec<String> = (0..30).map(|k| format!("{k}.tables")).collect();
    let per_node = topics.len() as f64;
    // Runtime tasks at idle, which the peer links' tasks are part of: a
    // link torn down and made again must not leave any behind.
    let idle = idle_tasks(&cluster.live().collect::<Vec<_>>()).await?;
    let mut sessions = Vec::new();
    for node in cluster.live() {
        sessions.push(subscribed_to(node, &topics).await?);
    }
    wait_interest(&cluster, 3.0 * per_node, "three nodes subscribed").await?;

    // kill -9 n3: its sessions die with it; the survivors forget its
    // interest and take over its topics with their own.
    drop(sessions.pop());
    cluster.kill9(2).await?;
    cluster
        .wait_ring(&[0, 1], &["n1", "n2"], Duration::from_secs(15))
        .await?;
    wait_interest(&cluster, 2.0 * per_node, "n3 dead").await?;

    // n3 back, with a subscriber again: its topics move back to it, and the
    // survivors that owned them meanwhile let go of their interest.
    cluster.restart(2).await?;
    cluster.wait_converged(Duration::from_secs(30)).await?;
    sessions.push(subscribed_to(&cluster.nodes[2], &topics).await?);
    wait_interest(&cluster, 3.0 * per_node, "n3 back and subscribed").await?;

    // Every subscriber still gets every topic's messages.
    let mut publisher = cluster.nodes[2].ws().await?;
    for topic in &topics {
        publisher.publish(topic, json!(topic)).await?;
    }
    // Topics have their own owners, so their messages may come in any order.
    let want: BTreeSet<String> = topics.iter().cloned().collect();
    for ws in &mut sessions {
        let mut got = BTreeSet::new();
        for _ in &topics {
            let msg = ws.recv().await?;
            ensure!(msg["op"] == "msg" && msg["data"] == msg["topic"], "{msg}");
            got.insert(msg["topic"].as_str().unwrap_or_default().to_owned());
        }
        ensure!(got == want, "got messages on {got:?}");
    }
    publisher.close().await?;
    for ws in sessions {
        ws.close().await?;
    }
    wait_interest(&cluster, 0.0, "every session closed").await?;
    back_to_idle(&cluster.live().collect::<Vec<_>>(), &idle, 0.0).await?;
    Ok(())
}

#[tokio::test]
async fn a_slow_consumer_closed_by_its_node_leaves_nothing_behind() -> Result<()> {
    let cluster = Cluster::start(3, |b| b.flag("--client-outbound-queue", "16")).await?;
    let nodes: Vec<&Node> = cluster.live().collect();
    let idle = idle_tasks(&nodes).await?;
    // A session on n3 that never reads, on topics whose owners are all
    // over the ring, flooded from n2.
    let topics: Vec<String> = (0..6).map(|k| format!("{k}.slow")).collect();
    let mut slow = nodes[2].ws_connect().recv_buffer(4096).connect().await?;
    for topic in &topics {
        slow.sub(topic).await?;
    }
    // Counted first, so that the zeros awaited at the end are a later count.
    settled(nodes[2], |m| {
        m.labeled("herald_table_entries", "table", "local") == topics.len() as f64
    })
    .await?;
    let mut publisher = nodes[1].ws().await?;
    let data = json!("z".repeat(2048));
    let started = Instant::now();
    loop {
        for topic in topics.iter().cycle().take(60) {
            publisher
                .feed_json(json!({"op": "pub", "topic": topic, "data": data}))
                .await?;
        }
        publisher.flush().await?;
        publisher.assert_alive().await?;
        if nodes[2].metrics().await?.sum("herald_slow_consumers_total") >= 1.0 {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the session that never reads was not closed as a slow consumer"
        );
    }
    slow.expect_close(4001, Duration::from_secs(10)).await?;
    publisher.close().await?;
    back_to_idle(&nodes, &idle, 0.0).await?;
    Ok(())
}
