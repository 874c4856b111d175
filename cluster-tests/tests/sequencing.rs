//! Sequence numbers, epochs, publish order, and recovery with `since`:
//! gap-free replay then live delivery, `recovered` rules, and the history
//! limit.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use cluster_tests::{seq_epoch, Node, WsClient, QUIET};
use serde_json::{json, Value};

/// Sends a `sub` with `since`/`epoch` and collects its `ok` plus `n_msgs`
/// messages (the `ok` may come before, between or after the replay).
async fn sub_since(
    ws: &mut WsClient,
    topic: &str,
    since: u64,
    epoch: &str,
    n_msgs: usize,
) -> Result<(Value, Vec<Value>)> {
    let id = ws.fresh_id();
    ws.send_json(json!({"op": "sub", "id": id, "topic": topic, "since": since, "epoch": epoch}))
        .await?;
    let mut ok = None;
    let mut msgs = Vec::new();
    while ok.is_none() || msgs.len() < n_msgs {
        let v = ws.recv().await.with_context(|| {
            format!(
                "after sub since {since}: ok {ok:?}, {} msgs so far",
                msgs.len()
            )
        })?;
        match v["op"].as_str() {
            Some("ok") if v["id"] == id && ok.is_none() => ok = Some(v),
            Some("msg") => msgs.push(v),
            _ => bail!("unexpected {v}"),
        }
    }
    Ok((ok.unwrap_or_default(), msgs))
}

fn seqs(msgs: &[Value]) -> Vec<u64> {
    msgs.iter().filter_map(|m| m["seq"].as_u64()).collect()
}

#[tokio::test]
async fn seq_starts_at_one_and_rises_by_one_per_topic() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws().await?;
    let (_, epoch) = seq_epoch(&ws.sub("seq.a").await?)?;
    let mut epoch_b = None;
    for i in 1..=20u64 {
        let (seq, e) = ws.publish_quiet("seq.a", json!(i)).await?;
        ensure!(
            seq == i && e == epoch,
            "pub {i} on seq.a: seq {seq} epoch {e}"
        );
        // Another topic has its own sequence.
        if i % 5 == 0 {
            let (seq_b, e_b) = ws.publish_quiet("seq.b", json!(i)).await?;
            ensure!(seq_b == i / 5, "seq.b: {seq_b}");
            ensure!(
                *epoch_b.get_or_insert(e_b.clone()) == e_b,
                "seq.b epoch moved"
            );
        }
    }
    for i in 1..=20u64 {
        let msg = ws.expect_msg("seq.a", &json!(i)).await?;
        ensure!(msg["seq"] == i, "{msg}");
    }
    let mut late = node.ws().await?;
    let ok = late.sub("seq.a").await?;
    ensure!(ok["seq"] == 20 && ok["epoch"] == epoch.as_str(), "{ok}");
    let ok = late.sub("seq.never").await?;
    ensure!(ok["seq"] == 0 && ok["epoch"].is_string(), "{ok}");
    late.close().await?;
    ws.close().await
}

/// Publishing to a topic this session is subscribed to would interleave
/// msgs with oks; these helpers publish from a session that is not.
trait QuietPublish {
    async fn publish_quiet(&mut self, topic: &str, data: Value) -> Result<(u64, String)>;
}

impl QuietPublish for WsClient {
    /// Publishes with an id and returns the `ok`'s seq and epoch, keeping any
    /// `msg` that arrives on the way for later reads.
    async fn publish_quiet(&mut self, topic: &str, data: Value) -> Result<(u64, String)> {
        let id = self.fresh_id();
        self.send_json(json!({"op": "pub", "id": id, "topic": topic, "data": data}))
            .await?;
        let mut held = Vec::new();
        let result = loop {
            let v = self.recv().await?;
            if v["op"] == "ok" && v["id"] == id {
                break seq_epoch(&v)?;
            }
            ensure!(v["op"] == "msg", "unexpected {v}");
            held.push(v);
        };
        self.requeue(held);
        Ok(result)
    }
}

#[tokio::test]
async fn one_sessions_pubs_are_sequenced_in_order_sent() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut sub = node.ws().await?;
    sub.sub("order.t").await?;
    let mut publisher = node.ws().await?;
    const N: u64 = 300;
    // Mixed acked and unacked, several per frame and one per frame.
    let mut acked = Vec::new();
    let mut i = 0;
    while i < N {
        if i % 7 == 0 {
            let batch: Vec<Value> = (i..(i + 5).min(N))
                .map(|j| {
                    if j % 2 == 0 {
                        json!({"op": "pub", "id": j, "topic": "order.t", "data": j})
                    } else {
                        json!({"op": "pub", "topic": "order.t", "data": j})
                    }
                })
                .collect();
            for j in i..(i + 5).min(N) {
                if j % 2 == 0 {
                    acked.push(j);
                }
            }
            i = (i + 5).min(N);
            publisher.feed_json(Value::Array(batch)).await?;
        } else {
            if i % 3 == 0 {
                publisher
                    .feed_json(json!({"op": "pub", "id": i, "topic": "order.t", "data": i}))
                    .await?;
                acked.push(i);
            } else {
                publisher
                    .feed_json(json!({"op": "pub", "topic": "order.t", "data": i}))
                    .await?;
            }
            i += 1;
        }
    }
    publisher.flush().await?;
    for j in acked {
        let ok = publisher.expect_ok(j).await?;
        ensure!(ok["seq"] == j + 1, "pub {j} was sequenced as {}", ok["seq"]);
    }
    for j in 0..N {
        let msg = sub.expect_msg("order.t", &json!(j)).await?;
        ensure!(msg["seq"] == j + 1, "{msg}");
    }
    sub.expect_nothing(QUIET).await?;
    sub.close().await?;
    publisher.close().await
}

#[tokio::test]
async fn recovery_replays_exactly_the_missed_messages_then_live() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut publisher = node.ws().await?;
    let mut sub = node.ws().await?;
    let (_, epoch) = seq_epoch(&sub.sub("rec.t").await?)?;
    for i in 1..=3 {
        publisher.publish("rec.t", json!(i)).await?;
    }
    for i in 1..=3 {
        sub.expect_msg("rec.t", &json!(i)).await?;
    }
    sub.close().await?;
    // Missed while away.
    for i in 4..=8 {
        publisher.publish("rec.t", json!(i)).await?;
    }
    let mut back = node.ws().await?;
    let (ok, replay) = sub_since(&mut back, "rec.t", 3, &epoch, 5).await?;
    ensure!(ok["recovered"] == true, "{ok}");
    ensure!(ok["seq"] == 8 && ok["epoch"] == epoch.as_str(), "{ok}");
    ensure!(seqs(&replay) == [4, 5, 6, 7, 8], "replay {replay:?}");
    for (m, i) in replay.iter().zip(4..) {
        ensure!(m["data"] == i && m["topic"] == "rec.t", "{m}");
    }
    // Then live, without duplicates.
    publisher.publish("rec.t", json!(9)).await?;
    let msg = back.expect_msg("rec.t", &json!(9)).await?;
    ensure!(msg["seq"] == 9, "{msg}");
    back.expect_nothing(QUIET).await?;
    back.close().await?;
    publisher.close().await
}

#[tokio::test]
async fn recovery_while_publishing_has_no_gap_and_no_duplicate() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut publisher = node.ws().await?;
    const TOTAL: u64 = 600;
    let (first, epoch) = publisher.publish("busy.t", json!(1)).await?;
    ensure!(first == 1);
    for i in 2..=50u64 {
        publisher.publish_unacked("busy.t", json!(i)).await?;
    }
    // Keep publishing while the subscriber recovers.
    let task = tokio::spawn(async move {
        for i in 51..=TOTAL {
            publisher.publish_unacked("busy.t", json!(i)).await?;
            if i % 25 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let (last, _) = publisher.publish("busy.t", json!("end")).await?;
        publisher.close().await?;
        anyhow::Ok(last)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut sub = node.ws().await?;
    let (ok, mut msgs) = sub_since(&mut sub, "busy.t", 10, &epoch, 0).await?;
    ensure!(ok["recovered"] == true, "{ok}");
    let last = task.await??;
    ensure!(last == TOTAL + 1);
    while msgs.last().and_then(|m| m["seq"].as_u64()) != Some(last) {
        msgs.push(sub.recv().await.context("waiting for the end marker")?);
    }
    let got = seqs(&msgs);
    let want: Vec<u64> = (11..=last).collect();
    if got != want {
        let dups = got.windows(2).filter(|w| w[1] <= w[0]).count();
        let gaps = got.windows(2).filter(|w| w[1] > w[0] + 1).count();
        bail!(
            "expected seqs 11..={last} once each, got {} messages ({} dup/backward, {} gaps), first {:?}",
            got.len(),
            dups,
            gaps,
            &got[..got.len().min(10)]
        );
    }
    sub.expect_nothing(QUIET).await?;
    sub.close().await
}

#[tokio::test]
async fn since_equal_to_current_seq_recovers_nothing_then_live() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut publisher = node.ws().await?;
    let mut epoch = String::new();
    for i in 1..=4 {
        (_, epoch) = publisher.publish("eq.t", json!(i)).await?;
    }
    let mut sub = node.ws().await?;
    let (ok, _) = sub_since(&mut sub, "eq.t", 4, &epoch, 0).await?;
    ensure!(ok["recovered"] == true && ok["seq"] == 4, "{ok}");
    sub.expect_nothing(QUIET).await?;
    publisher.publish("eq.t", json!(5)).await?;
    let msg = sub.expect_msg("eq.t", &json!(5)).await?;
    ensure!(msg["seq"] == 5);
    // since 0 with the right epoch replays everything retained.
    let mut all = node.ws().await?;
    let (ok, replay) = sub_since(&mut all, "eq.t", 0, &epoch, 5).await?;
    ensure!(ok["recovered"] == true, "{ok}");
    ensure!(seqs(&replay) == [1, 2, 3, 4, 5], "{replay:?}");
    all.expect_nothing(QUIET).await?;
    Ok(())
}

#[tokio::test]
async fn since_beyond_current_seq_is_not_recovered() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut publisher = node.ws().await?;
    let mut epoch = String::new();
    for i in 1..=3 {
        (_, epoch) = publisher.publish("ahead.t", json!(i)).await?;
    }
    let mut sub = node.ws().await?;
    let (ok, _) = sub_since(&mut sub, "ahead.t", 10, &epoch, 0).await?;
    ensure!(ok["recovered"] == false, "since 10 > seq 3: {ok}");
    ensure!(ok["seq"] == 3, "{ok}");
    // Only live messages follow.
    sub.expect_nothing(QUIET).await?;
    publisher.publish("ahead.t", json!(4)).await?;
    let msg = sub.expect_msg("ahead.t", &json!(4)).await?;
    ensure!(msg["seq"] == 4);
    sub.expect_nothing(QUIET).await?;
    Ok(())
}

#[tokio::test]
async fn since_with_another_epoch_is_not_recovered() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut publisher = node.ws().await?;
    let mut epoch = String::new();
    for i in 1..=3 {
        (_, epoch) = publisher.publish("epoch.t", json!(i)).await?;
    }
    let other = format!("{epoch}-not");
    let mut sub = node.ws().await?;
    let (ok, _) = sub_since(&mut sub, "epoch.t", 1, &other, 0).await?;
    ensure!(ok["recovered"] == false, "wrong epoch: {ok}");
    ensure!(
        ok["epoch"] == epoch.as_str(),
        "ok carries the real epoch: {ok}"
    );
    sub.expect_nothing(QUIET).await?;
    publisher.publish("epoch.t", json!(4)).await?;
    sub.expect_msg("epoch.t", &json!(4)).await?;
    sub.expect_nothing(QUIET).await?;
    Ok(())
}

#[tokio::test]
async fn recovered_only_appears_when_since_is_given() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws().await?;
    let ok = ws.sub("flag.t").await?;
    ensure!(ok.get("recovered").is_none(), "{ok}");
    let epoch = ok["epoch"].as_str().unwrap_or_default().to_owned();
    ws.unsub("flag.t").await?;
    let (ok, _) = sub_since(&mut ws, "flag.t", 0, &epoch, 0).await?;
    ensure!(ok["recovered"].is_boolean(), "{ok}");
    ws.close().await
}

#[tokio::test]
async fn history_limit_reports_unrecovered_and_replays_what_is_kept() -> Result<()> {
    let node = Node::start(&["--history-max-messages", "10"]).await?;
    let mut publisher = node.ws().await?;
    let mut epoch = String::new();
    for i in 1..=15 {
        (_, epoch) = publisher.publish("hist.t", json!(i)).await?;
    }
    // Seqs 6..=15 are retained.
    let mut lost = node.ws().await?;
    let (ok, replay) = sub_since(&mut lost, "hist.t", 2, &epoch, 10).await?;
    ensure!(ok["recovered"] == false, "3..=5 are gone: {ok}");
    ensure!(
        seqs(&replay) == (6..=15).collect::<Vec<_>>(),
        "retained replay: {:?}",
        seqs(&replay)
    );
    lost.expect_nothing(QUIET).await?;
    // Exactly at the edge: everything after 5 is retained.
    let mut edge = node.ws().await?;
    let (ok, replay) = sub_since(&mut edge, "hist.t", 5, &epoch, 10).await?;
    ensure!(ok["recovered"] == true, "since 5 with 6..=15 kept: {ok}");
    ensure!(seqs(&replay) == (6..=15).collect::<Vec<_>>());
    // One further back is not.
    let mut short = node.ws().await?;
    let (ok, _) = sub_since(&mut short, "hist.t", 4, &epoch, 10).await?;
    ensure!(ok["recovered"] == false, "since 4 with 6..=15 kept: {ok}");
    // Live delivery continues for all three.
    publisher.publish("hist.t", json!(16)).await?;
    for ws in [&mut lost, &mut edge, &mut short] {
        let msg = ws.expect_msg("hist.t", &json!(16)).await?;
        ensure!(msg["seq"] == 16);
        ws.expect_nothing(QUIET).await?;
    }
    Ok(())
}

#[tokio::test]
async fn over_the_node_history_budget_the_oldest_messages_go_first() -> Result<()> {
    const BUDGET: f64 = 40_960.0;
    let node = Node::start(&[
        "--node-shards",
        "1",
        "--client-max-message-bytes",
        "4096",
        "--history-max-bytes",
        "40960",
    ])
    .await?;
    let mut publisher = node.ws().await?;
    let text = "x".repeat(1000);
    let mut old_epoch = String::new();
    for _ in 0..5 {
        (_, old_epoch) = publisher.publish("budget.old", json!(text)).await?;
    }
    let mut new_epoch = String::new();
    for _ in 0..60 {
        (_, new_epoch) = publisher.publish("budget.new", json!(text)).await?;
    }
    // Each message counts about 2.3 KB: the histories keep the newest 17
    // or so, all of `budget.new`, and the older topic lost everything.
    let metrics = node.metrics().await?;
    let (bytes, kept) = (
        metrics.sum("herald_history_bytes"),
        metrics.sum("herald_history_messages"),
    );
    let evicted = metrics.sum("herald_history_evicted_total");
    ensure!(
        bytes > 0.0 && bytes <= BUDGET && (10.0..60.0).contains(&kept) && kept + evicted == 65.0,
        "history holds {kept} messages, {bytes} bytes; {evicted} evicted"
    );
    let mut old = node.ws().await?;
    let (ok, replay) = sub_since(&mut old, "budget.old", 0, &old_epoch, 0).await?;
    ensure!(ok["recovered"] == false && ok["seq"] == 5, "{ok}");
    ensure!(replay.is_empty(), "replayed {:?}", seqs(&replay));
    old.expect_nothing(QUIET).await?;
    // The newest ten are still there.
    let mut recent = node.ws().await?;
    let (ok, replay) = sub_since(&mut recent, "budget.new", 50, &new_epoch, 10).await?;
    ensure!(ok["recovered"] == true, "{ok}");
    ensure!(
        seqs(&replay) == (51..=60).collect::<Vec<_>>(),
        "{:?}",
        seqs(&replay)
    );
    // Live delivery is unaffected.
    publisher.publish("budget.old", json!(6)).await?;
    let msg = old.expect_msg("budget.old", &json!(6)).await?;
    ensure!(msg["seq"] == 6, "{msg}");
    Ok(())
}
