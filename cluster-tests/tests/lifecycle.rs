//! Shutdown and fault isolation: SIGTERM/SIGINT drain (readiness, refused
//! upgrades, close 1001 after the grace, exit 0), and a panicking session
//! that takes down nothing but itself.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cluster_tests::{Ended, Node, WsClient, QUIET};
use serde_json::{json, Value};

const GRACE: Duration = Duration::from_millis(1500);
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// Polls `/readyz` until it is 503 with exactly the reason `draining`.
async fn wait_draining(node: &Node) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let resp = node.admin_get("/readyz").await?;
        if resp.status == 503 {
            let body = resp.json()?;
            ensure!(
                body == json!({"ready": false, "reasons": ["draining"]}),
                "/readyz while draining: {body}"
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "/readyz still {} {} after the signal",
            resp.status,
            resp.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new WebSocket upgrade must not open a session.
async fn upgrade_is_refused(node: &Node) -> Result<()> {
    match node.ws_connect().try_connect().await {
        // The listener is closed (connection refused or reset)...
        Err(_) => Ok(()),
        // ...or the upgrade is answered with 503.
        Ok(Err(refusal)) => {
            ensure!(
                refusal.status == 503,
                "upgrade while draining refused with HTTP {}, not 503",
                refusal.status
            );
            Ok(())
        }
        Ok(Ok(mut ws)) => {
            // A 101 followed by an immediate close is not a session either,
            // but the contract wants no new session at all while draining.
            let ended = ws.wait_end(Duration::from_millis(500)).await;
            bail!("a new session was upgraded while draining (then: {ended:?})")
        }
    }
}

async fn drain_on(signal: libc::c_int) -> Result<()> {
    let mut node = Node::start(&["--node-drain-grace", "1500ms"]).await?;
    let mut a = node.ws().await?;
    a.sub("drain.t").await?;
    let mut b = node.ws_msgpack().await?;
    b.sub("drain.t").await?;
    b.publish("drain.t", json!("before")).await?;
    a.expect_msg("drain.t", &json!("before")).await?;
    b.expect_msg("drain.t", &json!("before")).await?;

    let signalled = Instant::now();
    node.signal(signal)?;
    wait_draining(&node).await?;
    let view = node.admin_get("/v1/cluster").await?.json()?;
    ensure!(
        view["members"][0]["state"] == "draining",
        "member state while draining: {view}"
    );
    upgrade_is_refused(&node).await?;

    // Open sessions keep working during the grace.
    a.assert_alive().await?;
    b.publish("drain.t", json!("during")).await?;
    b.expect_msg("drain.t", &json!("during")).await?;
    a.expect_msg("drain.t", &json!("during")).await?;
    ensure!(
        signalled.elapsed() < GRACE,
        "too slow to check the grace period"
    );

    // After the grace: 1001 for both.
    for (name, ws) in [("json", &mut a), ("msgpack", &mut b)] {
        let (ended, _) = ws.wait_end(GRACE + Duration::from_secs(3)).await?;
        ensure!(
            matches!(ended, Ended::Close(1001, _)),
            "{name} session ended with {ended:?}, not 1001"
        );
    }
    let closed_after = signalled.elapsed();
    ensure!(
        closed_after >= GRACE - Duration::from_millis(50),
        "sessions were closed {closed_after:?} after the signal, before the {GRACE:?} grace"
    );
    // Hang up (the node waits for our side of the close otherwise).
    drop(a);
    drop(b);
    let status = node.wait_exit(EXIT_WAIT).await?;
    ensure!(
        status.code() == Some(0),
        "herald exited with {status} after a drain"
    );
    let exited_after = signalled.elapsed();
    ensure!(
        exited_after < GRACE + Duration::from_secs(3),
        "exit took {exited_after:?}"
    );
    let log = node.log();
    ensure!(log.contains("draining"), "no drain in the log:\n{log}");
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_then_closes_with_1001_and_exits_0() -> Result<()> {
    drain_on(libc::SIGTERM).await
}

#[tokio::test]
async fn sigint_drains_then_closes_with_1001_and_exits_0() -> Result<()> {
    drain_on(libc::SIGINT).await
}

#[tokio::test]
async fn drain_ends_early_when_every_session_has_left() -> Result<()> {
    // A long grace that the test must not have to wait for.
    let mut node = Node::start(&["--node-drain-grace", "30s"]).await?;
    let mut ws = node.ws().await?;
    ws.assert_alive().await?;
    let signalled = Instant::now();
    node.sigterm()?;
    wait_draining(&node).await?;
    ws.assert_alive().await?;
    ws.close().await?;
    let status = node.wait_exit(EXIT_WAIT).await?;
    ensure!(status.code() == Some(0), "exit status {status}");
    ensure!(
        signalled.elapsed() < Duration::from_secs(5),
        "exit took {:?} with no session left",
        signalled.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn drain_is_bounded_when_clients_never_answer_the_close() -> Result<()> {
    let mut node = Node::start(&["--node-drain-grace", "500ms"]).await?;
    // Sessions that are never read again: they answer neither pings nor
    // the close frame.
    let mut deaf = Vec::new();
    for _ in 0..3 {
        let mut ws = node.ws().await?;
        ws.sub("deaf.t").await?;
        deaf.push(ws);
    }
    let signalled = Instant::now();
    node.sigterm()?;
    let status = node.wait_exit(Duration::from_secs(8)).await?;
    let took = signalled.elapsed();
    ensure!(status.code() == Some(0), "exit status {status}");
    ensure!(
        took < Duration::from_secs(6),
        "exit took {took:?} with a 500 ms grace"
    );
    // Each was told 1001 before the node went away.
    for ws in &mut deaf {
        let (ended, _) = ws.wait_end(Duration::from_secs(2)).await?;
        ensure!(
            matches!(ended, Ended::Close(1001, _)),
            "a deaf session ended with {ended:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn idle_node_exits_0_promptly_on_sigterm() -> Result<()> {
    let mut node = Node::start(&[]).await?;
    // The default grace is 10 s; with no session there is nothing to wait for.
    node.admin_get("/healthz").await?;
    let signalled = Instant::now();
    node.sigterm()?;
    let status = node.wait_exit(EXIT_WAIT).await?;
    ensure!(status.code() == Some(0), "exit status {status}");
    ensure!(
        signalled.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        signalled.elapsed()
    );
    Ok(())
}

const PANIC_TOPIC: &str = "fault.boom";

/// `n` messages on `topic` with consecutive seqs from `first`, data `i`.
async fn expect_run(ws: &mut WsClient, topic: &str, first: u64, data: &[Value]) -> Result<()> {
    for (i, want) in data.iter().enumerate() {
        let seq = first + i as u64;
        let msg = ws
            .expect_msg(topic, want)
            .await
            .with_context(|| format!("message seq {seq}"))?;
        ensure!(msg["seq"] == seq, "expected seq {seq}: {msg}");
    }
    Ok(())
}

#[tokio::test]
async fn a_panicking_session_is_closed_with_1011_and_nothing_else_is_hurt() -> Result<()> {
    let node = Node::start(&["--testing-panic-topic", PANIC_TOPIC]).await?;
    let mut watcher = node.ws().await?;
    watcher.sub("steady.t").await?;
    let mut mp_watcher = node.ws_msgpack().await?;
    mp_watcher.sub("steady.*").await?;
    let mut victim = node.ws().await?;
    victim.sub("victim.t").await?;
    victim.sub("steady.t").await?;
    let mut publisher = node.ws().await?;

    let batch = |range: std::ops::Range<u64>| -> Vec<Value> { range.map(|i| json!(i)).collect() };
    let first = batch(0..50);
    for data in &first {
        publisher.publish_unacked("steady.t", data.clone()).await?;
    }
    // The panic, while the first batch is on its way.
    victim
        .send_json(json!({"op": "pub", "id": 7, "topic": PANIC_TOPIC, "data": "boom"}))
        .await?;
    let second = batch(50..100);
    for data in &second {
        publisher.publish_unacked("steady.t", data.clone()).await?;
    }
    let (seq, _) = publisher.publish("steady.t", json!(100)).await?;
    ensure!(seq == 101, "the last of 101 messages has seq {seq}");

    let (ended, _) = victim.wait_end(Duration::from_secs(5)).await?;
    ensure!(
        matches!(ended, Ended::Close(1011, _)),
        "the panicking session ended with {ended:?}, not 1011"
    );
    drop(victim);

    // Everyone else got everything, in order, once.
    let all = batch(0..101);
    expect_run(&mut watcher, "steady.t", 1, &all).await?;
    expect_run(&mut mp_watcher, "steady.t", 1, &all).await?;
    watcher.expect_nothing(QUIET).await?;
    mp_watcher.expect_nothing(QUIET).await?;

    node.wait_metric("herald_session_panics_total", Duration::from_secs(3), |v| {
        v == 1.0
    })
    .await?;
    node.wait_metric_labeled(
        "herald_disconnects_total",
        ("code", "1011"),
        Duration::from_secs(3),
        |v| v == 1.0,
    )
    .await?;
    // The victim's subscriptions are gone; the others' are not.
    node.wait_metric("herald_connections", Duration::from_secs(3), |v| v == 3.0)
        .await?;
    ensure!(
        node.admin_get("/healthz").await?.status == 200,
        "healthz after a panic"
    );
    let (seq, _) = publisher.publish("victim.t", json!("anyone?")).await?;
    ensure!(seq == 1, "victim.t seq {seq}");
    publisher.assert_alive().await?;
    watcher.assert_alive().await?;

    // The same again from a fresh session: still isolated, counted again.
    let mut second_victim = node.ws_msgpack().await?;
    second_victim
        .publish_unacked(PANIC_TOPIC, json!(null))
        .await?;
    let (ended, _) = second_victim.wait_end(Duration::from_secs(5)).await?;
    ensure!(
        matches!(ended, Ended::Close(1011, _)),
        "the second panicking session ended with {ended:?}"
    );
    drop(second_victim);
    node.wait_metric("herald_session_panics_total", Duration::from_secs(3), |v| {
        v == 2.0
    })
    .await?;
    publisher.publish("steady.t", json!("after")).await?;
    watcher.expect_msg("steady.t", &json!("after")).await?;
    mp_watcher.expect_msg("steady.t", &json!("after")).await?;
    // The fault is injected in sessions only; an HTTP publish to the topic
    // must not bring anything down either.
    let resp = node
        .http_publish(PANIC_TOPIC, Some("application/json"), b"1", &[])
        .await?;
    ensure!(
        resp.status == 200 || resp.status >= 500,
        "HTTP publish to the panic topic: {} {}",
        resp.status,
        resp.text()
    );
    ensure!(
        node.admin_get("/healthz").await?.status == 200,
        "healthz after an HTTP publish to the panic topic"
    );
    watcher.assert_alive().await?;
    node.wait_metric("herald_session_panics_total", Duration::from_secs(1), |v| {
        v == 2.0
    })
    .await?;
    watcher.close().await?;
    mp_watcher.close().await?;
    publisher.close().await
}
