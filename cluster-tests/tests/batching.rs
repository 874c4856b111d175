//! `client.write_delay`: a session holds messages back to send them
//! together, never holds a reply back, and never turns its own batching
//! into a slow-consumer close.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use cluster_tests::Node;
use serde_json::{json, Value};

fn data_of(frame: &[Value]) -> Vec<Value> {
    frame
        .iter()
        .filter(|v| v["op"] == "msg")
        .map(|v| v["data"].clone())
        .collect()
}

#[tokio::test]
async fn messages_are_batched_and_replies_are_not_held() -> Result<()> {
    let node = Node::start(&["--client-write-delay", "1s"]).await?;
    let mut sub = node.ws().await?;
    sub.sub("batch.t").await?;
    let mut publisher = node.ws().await?;
    // The `ok` above was a write; once the delay has passed since it, the
    // next message goes out at once.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    publisher.publish("batch.t", json!(1)).await?;
    let first = sub.recv_frame(Duration::from_secs(5)).await?;
    let first_at = Instant::now();
    ensure!(data_of(&first) == [json!(1)], "first frame: {first:?}");

    // Within the delay of that write: held back, then sent as one frame.
    for n in 2..=4 {
        publisher.publish("batch.t", json!(n)).await?;
    }
    let batch = sub.recv_frame(Duration::from_secs(5)).await?;
    let held = first_at.elapsed();
    ensure!(
        data_of(&batch) == [json!(2), json!(3), json!(4)],
        "the held messages come as one frame, in order: {batch:?}"
    );
    ensure!(
        held >= Duration::from_millis(700),
        "the batch came {held:?} after the previous write, before the 1s delay"
    );

    // A reply is not held back: it goes out at once, after the message
    // queued before it.
    publisher.publish("batch.t", json!(5)).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pinged = Instant::now();
    sub.send_json(json!({"op": "ping", "id": 77})).await?;
    let mut got = sub.recv_frame(Duration::from_secs(5)).await?;
    if !got.iter().any(|v| v["op"] == "pong") {
        got.extend(sub.recv_frame(Duration::from_secs(5)).await?);
    }
    let answered = pinged.elapsed();
    let ops: Vec<&Value> = got.iter().map(|v| &v["op"]).collect();
    ensure!(
        ops == [&json!("msg"), &json!("pong")] && got[0]["data"] == 5 && got[1]["id"] == 77,
        "message 5 then the pong: {got:?}"
    );
    ensure!(
        answered < Duration::from_millis(700),
        "the pong was held back for {answered:?}"
    );

    let metrics = node.metrics().await?;
    ensure!(
        metrics.sum("herald_client_writes_total") >= 3.0,
        "writes are counted"
    );
    Ok(())
}

#[tokio::test]
async fn a_filling_queue_is_written_at_once() -> Result<()> {
    // 100 messages within one 1s delay would overflow a 64-message queue;
    // the session writes each time it is half full instead. They come in
    // rounds of 10, so the queue never fills between two writes.
    let node = Node::start(&[
        "--client-write-delay",
        "1s",
        "--client-outbound-queue",
        "64",
    ])
    .await?;
    let mut sub = node.ws().await?;
    sub.sub("fill.t").await?;
    let mut publisher = node.ws().await?;
    let started = Instant::now();
    for round in 0..10 {
        for n in round * 10..round * 10 + 9 {
            publisher
                .feed_json(json!({"op": "pub", "topic": "fill.t", "data": n}))
                .await?;
        }
        publisher.flush().await?;
        publisher.publish("fill.t", json!(round * 10 + 9)).await?;
    }
    let published_in = started.elapsed();
    let mut got = Vec::new();
    while got.len() < 100 {
        let frame = sub.recv_frame(Duration::from_secs(5)).await?;
        got.extend(data_of(&frame));
    }
    let expected: Vec<Value> = (0..100).map(|n| json!(n)).collect();
    ensure!(got == expected, "all 100 in order: {got:?}");
    ensure!(
        published_in < Duration::from_millis(900),
        "publishing took {published_in:?}, longer than the delay: the test proves nothing"
    );
    sub.assert_alive().await?;
    let metrics = node.metrics().await?;
    ensure!(
        metrics.sum("herald_slow_consumers_total") == 0.0,
        "batching made a slow consumer"
    );
    Ok(())
}
