//! Load-aware readiness: `/readyz` turns 503 with a reason when the runtime
//! falls behind (scheduling lag) or memory nears its limit, and recovers
//! when the load goes. (Connections, draining and joining are covered in
//! `admin.rs`, `lifecycle.rs` and `cluster.rs`.)

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cluster_tests::Node;
use serde_json::{json, Value};

/// Polls `/readyz` until `check` accepts its body.
async fn wait_for_readyz(
    node: &Node,
    what: &str,
    check: impl Fn(u16, &Value) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = node.admin_get("/readyz").await?;
        let body = resp.json()?;
        if check(resp.status, &body) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("/readyz never showed {what}: last {} {body}", resp.status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_reason(body: &Value, reason: &str) -> bool {
    body["reasons"]
        .as_array()
        .is_some_and(|r| r.iter().any(|x| x == reason))
}

#[tokio::test]
async fn a_stalled_runtime_is_not_ready_until_it_catches_up() -> Result<()> {
    // One worker thread, so a blocked worker stalls every timer.
    let node = Node::start(&[
        "--node-worker-threads",
        "1",
        "--testing-stall-topic",
        "stall.now",
        "--admin-max-scheduling-lag",
        "200ms",
    ])
    .await?;
    wait_for_readyz(&node, "ready", |status, _| status == 200).await?;
    let mut ws = node.ws().await?;
    ws.publish_unacked("stall.now", json!(1)).await?;
    wait_for_readyz(&node, "scheduling_lag", |status, body| {
        status == 503 && body["ready"] == false && has_reason(body, "scheduling_lag")
    })
    .await?;
    let metrics = node.metrics().await?;
    let lag = metrics.sum("herald_scheduling_lag_seconds");
    if lag < 0.2 {
        bail!("herald_scheduling_lag_seconds is {lag}, expected the stall to show");
    }
    // The stall is over: ready again within the probe's window.
    wait_for_readyz(&node, "ready again", |status, body| {
        status == 200 && body == &json!({"ready": true, "reasons": []})
    })
    .await?;
    ws.close().await
}

#[tokio::test]
async fn memory_over_its_budget_is_not_ready() -> Result<()> {
    // A 1 MiB budget: the process's resident memory is well over it.
    let node = Node::start(&["--admin-memory-limit", "1048576"]).await?;
    wait_for_readyz(&node, "memory", |status, body| {
        status == 503 && has_reason(body, "memory")
    })
    .await?;
    // A generous budget and fraction: ready.
    let roomy = Node::start(&[
        "--admin-memory-limit",
        "68719476736",
        "--admin-max-memory-fraction",
        "0.5",
    ])
    .await?;
    wait_for_readyz(&roomy, "ready", |status, _| status == 200).await
}

#[tokio::test]
async fn a_bad_memory_fraction_is_refused_at_start() -> Result<()> {
    let result = Node::start(&["--admin-max-memory-fraction", "1.5"]).await;
    if result.is_ok() {
        bail!("a node started with admin.max_memory_fraction = 1.5");
    }
    Ok(())
}
