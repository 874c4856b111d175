//! Limits and protection: message size (1009), subscriptions per session,
//! slow consumers (4001), heartbeat timeout (4002), connection cap and
//! admission rate (1013), and the handshake timeout.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cluster_tests::{Ended, Node, WsClient, QUIET};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn oversize_message_closes_with_1009() -> Result<()> {
    let node = Node::start(&["--client-max-message-bytes", "1024"]).await?;
    let mut ws = node.ws().await?;
    // Exactly at the limit is fine.
    let ping = r#"{"op":"ping","id":1}"#;
    let padded = format!("{ping}{}", " ".repeat(1024 - ping.len()));
    assert_eq!(padded.len(), 1024);
    ws.send_raw_text(&padded).await?;
    ws.expect_pong(1).await?;
    ws.sub("size.t").await?;
    let data = "x".repeat(900);
    ws.publish_unacked("size.t", json!(data)).await?;
    ws.expect_msg("size.t", &json!(data)).await?;
    // One byte over is not.
    let over = format!("{ping}{}", " ".repeat(1025 - ping.len()));
    ws.send_raw_text(&over).await?;
    ws.expect_close(1009, CLOSE_WAIT).await?;
    // The same for msgpack, and with a much larger message.
    let mut mp = node.ws_msgpack().await?;
    mp.assert_alive().await?;
    mp.send_json(json!({"op": "pub", "topic": "size.t", "data": "y".repeat(5000)}))
        .await?;
    mp.expect_close(1009, CLOSE_WAIT).await?;
    // Other sessions are unaffected.
    let mut other = node.ws().await?;
    other.assert_alive().await?;
    other.close().await
}

#[tokio::test]
async fn too_many_subscriptions_is_limit_exceeded() -> Result<()> {
    let node = Node::start(&["--client-max-subscriptions", "5"]).await?;
    let mut ws = node.ws().await?;
    for pattern in ["s.1", "s.2", "s.*", "s.>", "t.1"] {
        ws.sub(pattern).await?;
    }
    ws.send_json(json!({"op": "sub", "id": 66, "topic": "s.6"}))
        .await?;
    ws.expect_err(Some(66), "limit_exceeded").await?;
    ws.send_json(json!({"op": "sub", "id": 67, "topic": "s.7", "group": "g"}))
        .await?;
    ws.expect_err(Some(67), "limit_exceeded").await?;
    ws.assert_alive().await?;
    // The refused subscription delivers nothing; the others still work.
    let mut publisher = node.ws().await?;
    publisher.publish("s.6", json!("six")).await?;
    // s.6 matches s.* and s.> (once): that delivery is from those.
    ws.expect_msg("s.6", &json!("six")).await?;
    ws.unsub("s.*").await?;
    ws.unsub("s.>").await?;
    publisher.publish("s.6", json!("again")).await?;
    ws.expect_nothing(QUIET).await?;
    // Room again after unsub.
    ws.sub("s.6").await?;
    ws.sub("s.7").await?;
    ws.send_json(json!({"op": "sub", "id": 68, "topic": "s.8"}))
        .await?;
    ws.expect_err(Some(68), "limit_exceeded").await?;
    // The limit is per session.
    let mut other = node.ws().await?;
    for pattern in ["s.1", "s.2", "s.3", "s.4", "s.5"] {
        other.sub(pattern).await?;
    }
    ws.close().await?;
    other.close().await
}

#[tokio::test]
async fn slow_consumer_is_closed_with_4001_and_counted() -> Result<()> {
    let node = Node::start(&["--client-outbound-queue", "16"]).await?;
    let before = node.metrics().await?.sum("herald_slow_consumers_total");
    ensure!(before == 0.0, "slow consumers before the test: {before}");
    let mut slow = node.ws_connect().recv_buffer(4096).connect().await?;
    slow.sub("flood.t").await?;
    let mut healthy = node.ws().await?;
    healthy.sub("other.t").await?;
    let mut publisher = node.ws().await?;
    let data = json!("z".repeat(8 * 1024));
    let started = Instant::now();
    let mut published = 0u32;
    let mut counted = false;
    // The slow session never reads; publish until the node gives up on it.
    while started.elapsed() < Duration::from_secs(20) && published < 20_000 {
        for _ in 0..50 {
            publisher
                .feed_json(json!({"op": "pub", "topic": "flood.t", "data": data}))
                .await?;
        }
        publisher.flush().await?;
        publisher.assert_alive().await?;
        published += 50;
        if node.metrics().await?.sum("herald_slow_consumers_total") >= 1.0 {
            counted = true;
            break;
        }
    }
    ensure!(
        counted,
        "herald_slow_consumers_total did not move after {published} messages of 8 KiB \
         to a session that never reads"
    );
    let closed = slow.expect_close(4001, Duration::from_secs(10)).await;
    closed.with_context(|| format!("after {published} messages"))?;
    // Nobody else was hurt.
    publisher.assert_alive().await?;
    publisher.publish("other.t", json!(1)).await?;
    healthy.expect_msg("other.t", &json!(1)).await?;
    let after = node.metrics().await?.sum("herald_slow_consumers_total");
    ensure!(after == 1.0, "herald_slow_consumers_total is {after}");
    healthy.close().await?;
    publisher.close().await
}

#[tokio::test]
async fn silent_client_is_closed_with_4002() -> Result<()> {
    let node = Node::start(&[
        "--client-idle-timeout",
        "1500ms",
        "--client-ping-interval",
        "500ms",
    ])
    .await?;
    let mut silent = node.ws().await?;
    silent.assert_alive().await?;
    // Neither read nor write: tungstenite only answers pings while polled.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    silent.expect_close(4002, CLOSE_WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() -> Result<()> {
    let node = Node::start(&[
        "--client-idle-timeout",
        "1500ms",
        "--client-ping-interval",
        "300ms",
    ])
    .await?;
    let mut reader = node.ws().await?;
    // Reading lets tungstenite answer the server's pings with pongs.
    reader.expect_nothing(Duration::from_millis(3000)).await?;
    reader.assert_alive().await?;
    // A client that keeps sending frames stays too.
    let mut talker = node.ws().await?;
    for _ in 0..10 {
        talker.assert_alive().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    reader.close().await?;
    talker.close().await
}

/// Whether a fresh session is admitted: `Ok(true)` when a ping gets its
/// pong, `Ok(false)` when the node closes it with 1013.
async fn admitted(node: &Node) -> Result<bool> {
    let mut ws = node.ws().await?;
    let id = ws.fresh_id();
    // The node may close before it reads this; a failed send is fine.
    let _ = ws.send_json(json!({"op": "ping", "id": id})).await;
    match ws.recv().await {
        Ok(v) if v["op"] == "pong" && v["id"] == id => Ok(true),
        Ok(v) => bail!("unexpected {v}"),
        Err(e) => match ws.ended() {
            Some(Ended::Close(1013, _)) => Ok(false),
            other => bail!("expected pong or close 1013, got {other:?}: {e:#}"),
        },
    }
}

#[tokio::test]
async fn over_max_connections_is_closed_with_1013() -> Result<()> {
    let node = Node::start(&["--client-max-connections", "2"]).await?;
    let mut first = node.ws().await?;
    first.assert_alive().await?;
    let mut second = node.ws().await?;
    second.assert_alive().await?;
    let mut third = node.ws().await?;
    third.expect_close(1013, CLOSE_WAIT).await?;
    ensure!(!admitted(&node).await?, "a fourth session was admitted");
    first.assert_alive().await?;
    second.assert_alive().await?;
    let rejections = node
        .metrics()
        .await?
        .sum("herald_admission_rejections_total");
    ensure!(
        rejections >= 2.0,
        "herald_admission_rejections_total is {rejections}"
    );
    // Room again once one leaves.
    first.close().await?;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if admitted(&node).await? {
            break;
        }
        ensure!(Instant::now() < deadline, "no room after a session left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    second.assert_alive().await?;
    second.close().await
}

#[tokio::test]
async fn admission_rate_above_threshold_closes_extra_with_1013() -> Result<()> {
    let node = Node::start(&[
        "--client-admission-threshold",
        "2",
        "--client-admission-rate",
        "1",
    ])
    .await?;
    let mut kept: Vec<WsClient> = Vec::new();
    for _ in 0..2 {
        let mut ws = node.ws().await?;
        ws.assert_alive().await?;
        kept.push(ws);
    }
    // Above the threshold at most about one new session a second gets in.
    let mut admitted_now = 0;
    let mut refused = 0;
    let mut extra = Vec::new();
    for _ in 0..6 {
        let mut ws = node.ws().await?;
        let id = ws.fresh_id();
        let _ = ws.send_json(json!({"op": "ping", "id": id})).await;
        match ws.recv().await {
            Ok(v) if v["op"] == "pong" => {
                admitted_now += 1;
                extra.push(ws);
            }
            Ok(v) => bail!("unexpected {v}"),
            Err(e) => match ws.ended() {
                Some(Ended::Close(1013, _)) => refused += 1,
                other => bail!("expected pong or 1013, got {other:?}: {e:#}"),
            },
        }
    }
    ensure!(
        admitted_now <= 2 && refused >= 4,
        "6 quick connections above the threshold at 1/s: {admitted_now} admitted, {refused} refused"
    );
    for ws in &mut kept {
        ws.assert_alive().await?;
    }
    let rejections = node
        .metrics()
        .await?
        .sum("herald_admission_rejections_total");
    ensure!(
        rejections >= 4.0,
        "herald_admission_rejections_total is {rejections}"
    );
    // After a second, one more gets in.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    ensure!(
        admitted(&node).await?,
        "no admission after waiting 1.3 s at 1/s"
    );
    Ok(())
}

#[tokio::test]
async fn incomplete_handshake_is_dropped_after_the_timeout() -> Result<()> {
    let node = Node::start(&["--client-handshake-timeout", "1s"]).await?;
    let mut half = TcpStream::connect(node.client_addr()).await?;
    half.set_nodelay(true)?;
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: herald\r\nUpgrade: websocket\r\n")
        .await?;
    let mut silent = TcpStream::connect(node.client_addr()).await?;
    let started = Instant::now();
    for (name, stream) in [("half a request", &mut half), ("nothing", &mut silent)] {
        let mut buf = [0u8; 1024];
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue, // e.g. a 408 before the close
                }
            }
        })
        .await;
        ensure!(
            outcome.is_ok(),
            "a connection that sent {name} was still open after {:?}",
            started.elapsed()
        );
    }
    let elapsed = started.elapsed();
    ensure!(
        elapsed >= Duration::from_millis(700),
        "dropped after {elapsed:?}, before the 1 s timeout"
    );
    // An established session is not subject to it.
    let mut ws = node.ws().await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    ws.assert_alive().await?;
    ws.close().await
}
