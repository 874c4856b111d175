//! The admin port: `/healthz`, `/readyz`, `/v1/cluster` (the contract's
//! "Admin JSON" shapes) and `/metrics` (Prometheus text whose counters
//! follow the traffic).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use cluster_tests::{Ended, Metrics, Node, NodeBuilder, WsClient, QUIET};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(3);

/// The keys of a JSON object, which must be exactly `keys`.
fn check_keys(what: &str, v: &Value, keys: &[&str]) -> Result<()> {
    let Some(object) = v.as_object() else {
        bail!("{what} is not an object: {v}");
    };
    let have: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = keys.iter().copied().collect();
    ensure!(
        have == want,
        "{what} has keys {have:?}, expected {want:?}: {v}"
    );
    Ok(())
}

fn check_json_content_type(resp: &cluster_tests::HttpResponse) -> Result<()> {
    let ct = resp.header("content-type").unwrap_or_default();
    ensure!(
        ct.starts_with("application/json"),
        "content-type is {ct:?}, not JSON"
    );
    Ok(())
}

/// `/readyz` as (status, body), checking the body's shape.
async fn readyz(node: &Node) -> Result<(u16, Value)> {
    let resp = node.admin_get("/readyz").await?;
    check_json_content_type(&resp)?;
    let body = resp.json()?;
    check_keys("/readyz", &body, &["ready", "reasons"])?;
    ensure!(
        body["ready"].is_boolean() && body["reasons"].is_array(),
        "/readyz body types: {body}"
    );
    ensure!(
        body["ready"] == (resp.status == 200),
        "/readyz status {} disagrees with its body {body}",
        resp.status
    );
    Ok((resp.status, body))
}

/// Polls `/readyz` until it answers `status` with these reasons.
async fn wait_readyz(node: &Node, status: u16, reasons: &[&str]) -> Result<()> {
    let want = json!({"ready": status == 200, "reasons": reasons});
    let deadline = Instant::now() + WAIT;
    loop {
        let (got_status, body) = readyz(node).await?;
        if got_status == status && body == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("/readyz is {got_status} {body}, expected {status} {want}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn healthz_and_readyz_answer_200_on_a_fresh_node() -> Result<()> {
    let node = Node::start(&[]).await?;
    let resp = node.admin_get("/healthz").await?;
    ensure!(
        resp.status == 200,
        "/healthz: {} {}",
        resp.status,
        resp.text()
    );
    let (status, body) = readyz(&node).await?;
    ensure!(status == 200, "/readyz: {status} {body}");
    ensure!(
        body == json!({"ready": true, "reasons": []}),
        "/readyz body: {body}"
    );
    // Still so with sessions open and traffic flowing.
    let mut ws = node.ws().await?;
    ws.sub("h.t").await?;
    ws.publish("h.t", json!(1)).await?;
    ensure!(node.admin_get("/healthz").await?.status == 200, "healthz");
    wait_readyz(&node, 200, &[]).await?;
    ws.close().await
}

#[tokio::test]
async fn cluster_view_has_the_contract_shape() -> Result<()> {
    let node = NodeBuilder::new("admin-node-1")
        .args(["--cluster-vnodes", "64"])
        .start()
        .await?;
    let resp = node.admin_get("/v1/cluster").await?;
    ensure!(resp.status == 200, "/v1/cluster: {}", resp.status);
    check_json_content_type(&resp)?;
    let view = resp.json()?;
    check_keys("/v1/cluster", &view, &["node_id", "members", "ring"])?;
    ensure!(view["node_id"] == "admin-node-1", "node_id: {view}");

    let members = view["members"].as_array().cloned().unwrap_or_default();
    ensure!(members.len() == 1, "a single node has one member: {view}");
    let me = &members[0];
    check_keys(
        "member",
        me,
        &[
            "node_id",
            "state",
            "client_addr",
            "admin_addr",
            "cluster_addr",
            "generation",
        ],
    )?;
    ensure!(me["node_id"] == "admin-node-1", "member node_id: {me}");
    ensure!(me["state"] == "ready", "member state: {me}");
    ensure!(
        me["client_addr"] == node.client_addr().to_string(),
        "client_addr {} (node listens on {})",
        me["client_addr"],
        node.client_addr()
    );
    ensure!(
        me["admin_addr"] == node.admin_addr().to_string(),
        "admin_addr {} (node listens on {})",
        me["admin_addr"],
        node.admin_addr()
    );
    ensure!(
        me["cluster_addr"] == node.config.cluster_addr.to_string(),
        "cluster_addr {} (configured {})",
        me["cluster_addr"],
        node.config.cluster_addr
    );
    let generation = me["generation"].as_u64();
    ensure!(
        generation.is_some_and(|g| g > 0),
        "generation is not a positive u64: {me}"
    );

    let ring = &view["ring"];
    check_keys("ring", ring, &["vnodes", "owners"])?;
    ensure!(ring["vnodes"] == 64, "ring.vnodes: {ring}");
    let owners = ring["owners"].as_object().cloned().unwrap_or_default();
    ensure!(
        owners.keys().map(String::as_str).collect::<Vec<_>>() == ["admin-node-1"],
        "ring.owners: {ring}"
    );
    let share = owners["admin-node-1"].as_f64().unwrap_or(-1.0);
    ensure!(
        (share - 1.0).abs() < 1e-9,
        "a single node owns the whole ring: {ring}"
    );

    // Stable while the node lives; the generation changes with a restart.
    let again = node.admin_get("/v1/cluster").await?.json()?;
    ensure!(again == view, "/v1/cluster changed: {view} then {again}");
    drop(node);
    let restarted = NodeBuilder::new("admin-node-1").start().await?;
    let view2 = restarted.admin_get("/v1/cluster").await?.json()?;
    ensure!(
        view2["members"][0]["generation"].as_u64() != generation,
        "a restarted node kept its generation: {view2}"
    );
    ensure!(
        view2["ring"]["vnodes"] == 160,
        "default vnodes: {}",
        view2["ring"]
    );
    Ok(())
}

/// Every metric the docs promise (docs/protocol.md, "Metrics").
const DOCUMENTED: [&str; 14] = [
    "herald_connections",
    "herald_connections_by_codec",
    "herald_connects_total",
    "herald_disconnects_total",
    "herald_admission_rejections_total",
    "herald_messages_in_total",
    "herald_messages_out_total",
    "herald_bytes_in_total",
    "herald_bytes_out_total",
    "herald_slow_consumers_total",
    "herald_subscriptions",
    "herald_topics",
    "herald_history_messages",
    "herald_session_panics_total",
];

#[tokio::test]
async fn metrics_is_prometheus_text() -> Result<()> {
    let node = Node::start(&[]).await?;
    let resp = node.admin_get("/metrics").await?;
    ensure!(resp.status == 200, "/metrics: {}", resp.status);
    let ct = resp.header("content-type").unwrap_or_default();
    ensure!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "content-type {ct:?}"
    );
    let text = resp.text();
    ensure!(
        text.ends_with('\n'),
        "the exposition must end with a newline"
    );
    let metrics = Metrics::parse(&text);
    // Every non-comment line is a sample the parser understood, and every
    // sampled metric has a TYPE (and a HELP) line.
    let sample_lines = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .count();
    ensure!(
        sample_lines == metrics.samples.len(),
        "{sample_lines} sample lines, {} parsed",
        metrics.samples.len()
    );
    for sample in &metrics.samples {
        // A histogram's samples are NAME_bucket, NAME_sum and NAME_count
        // under one `TYPE NAME histogram`.
        let kind = metrics
            .types
            .iter()
            .find(|(n, _)| *n == sample.name)
            .map(|(_, k)| k.as_str())
            .or_else(|| {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| sample.name.strip_suffix(suffix))?;
                metrics
                    .types
                    .iter()
                    .find(|(n, k)| *n == base && k == "histogram")
                    .map(|_| "histogram")
            });
        ensure!(
            matches!(kind, Some("counter" | "gauge" | "histogram")),
            "{} has TYPE {kind:?}",
            sample.name
        );
        if kind == Some("counter") {
            ensure!(
                sample.name.ends_with("_total"),
                "counter {} not named _total",
                sample.name
            );
        }
        let family = if kind == Some("histogram") {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| sample.name.strip_suffix(suffix))
                .unwrap_or(&sample.name)
        } else {
            &sample.name
        };
        ensure!(
            text.contains(&format!("# HELP {family} ")),
            "{} has no HELP",
            sample.name
        );
        ensure!(
            sample.value.is_finite() && sample.value >= 0.0,
            "{}",
            sample.name
        );
    }
    for name in DOCUMENTED {
        ensure!(metrics.has(name), "/metrics lacks {name}");
    }
    for codec in ["json", "msgpack"] {
        ensure!(
            metrics
                .samples
                .iter()
                .any(|s| s.name == "herald_connections_by_codec"
                    && s.labels == [("codec".to_owned(), codec.to_owned())]),
            "no herald_connections_by_codec{{codec=\"{codec}\"}}"
        );
    }
    for reason in ["connection_limit", "admission_rate", "draining"] {
        ensure!(
            metrics
                .samples
                .iter()
                .any(|s| s.name == "herald_admission_rejections_total"
                    && s.labels == [("reason".to_owned(), reason.to_owned())]),
            "no herald_admission_rejections_total{{reason=\"{reason}\"}}"
        );
    }
    // A fresh node has counted nothing.
    for name in [
        "herald_connections",
        "herald_connects_total",
        "herald_disconnects_total",
        "herald_messages_in_total",
        "herald_messages_out_total",
        "herald_slow_consumers_total",
        "herald_subscriptions",
        "herald_session_panics_total",
    ] {
        ensure!(
            metrics.sum(name) == 0.0,
            "{name} is {} at start",
            metrics.sum(name)
        );
    }
    Ok(())
}

/// Polls until every `(name, value)` pair holds (sum over labels).
async fn wait_metrics(node: &Node, want: &[(&str, f64)]) -> Result<Metrics> {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = node.metrics().await?;
        let wrong: Vec<String> = want
            .iter()
            .filter(|(name, value)| m.sum(name) != *value)
            .map(|(name, value)| format!("{name} is {} (want {value})", m.sum(name)))
            .collect();
        if wrong.is_empty() {
            return Ok(m);
        }
        if Instant::now() > deadline {
            bail!("after {WAIT:?}: {}", wrong.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_follow_the_traffic() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut json_ws = node.ws().await?;
    let mut mp_ws = node.ws_msgpack().await?;
    let m = wait_metrics(
        &node,
        &[("herald_connections", 2.0), ("herald_connects_total", 2.0)],
    )
    .await?;
    ensure!(
        m.labeled("herald_connections_by_codec", "codec", "json") == 1.0
            && m.labeled("herald_connections_by_codec", "codec", "msgpack") == 1.0,
        "by codec: {:?}",
        m.samples
            .iter()
            .filter(|s| s.name == "herald_connections_by_codec")
            .collect::<Vec<_>>()
    );

    // Two subscribers, three messages from the msgpack one.
    json_ws.sub("m.t").await?;
    json_ws.sub("other.t").await?;
    mp_ws.sub("m.t").await?;
    wait_metrics(&node, &[("herald_subscriptions", 3.0)]).await?;
    for i in 0..3 {
        mp_ws
            .publish_unacked("m.t", json!(format!("message {i}")))
            .await?;
    }
    for i in 0..3 {
        json_ws
            .expect_msg("m.t", &json!(format!("message {i}")))
            .await?;
        mp_ws
            .expect_msg("m.t", &json!(format!("message {i}")))
            .await?;
    }
    let m = wait_metrics(
        &node,
        &[
            ("herald_messages_in_total", 3.0),
            ("herald_messages_out_total", 6.0),
            ("herald_history_messages", 3.0),
        ],
    )
    .await?;
    ensure!(m.sum("herald_topics") >= 1.0, "herald_topics is 0");
    let bytes_in = m.sum("herald_bytes_in_total");
    ensure!(bytes_in > 0.0, "herald_bytes_in_total is 0");
    let bytes_out = m.sum("herald_bytes_out_total");
    ensure!(bytes_out > 0.0, "herald_bytes_out_total is 0");

    // HTTP publish counts as a message in.
    let resp = node
        .http_publish("m.t", Some("application/json"), b"\"over http\"", &[])
        .await?;
    ensure!(resp.status == 200, "HTTP publish: {}", resp.status);
    json_ws.expect_msg("m.t", &json!("over http")).await?;
    mp_ws.expect_msg("m.t", &json!("over http")).await?;
    let m = wait_metrics(
        &node,
        &[
            ("herald_messages_in_total", 4.0),
            ("herald_messages_out_total", 8.0),
            ("herald_http_publishes_total", 1.0),
            ("herald_history_messages", 4.0),
        ],
    )
    .await?;
    ensure!(
        m.sum("herald_bytes_in_total") > bytes_in,
        "bytes in did not rise"
    );
    ensure!(
        m.sum("herald_bytes_out_total") > bytes_out,
        "bytes out did not rise"
    );

    // Unsubscribing and leaving take it all back down.
    json_ws.unsub("other.t").await?;
    wait_metrics(&node, &[("herald_subscriptions", 2.0)]).await?;
    json_ws.close().await?;
    mp_ws.close().await?;
    let m = wait_metrics(
        &node,
        &[
            ("herald_connections", 0.0),
            ("herald_subscriptions", 0.0),
            ("herald_connects_total", 2.0),
            ("herald_disconnects_total", 2.0),
        ],
    )
    .await?;
    ensure!(
        m.labeled("herald_disconnects_total", "code", "1000") == 2.0,
        "two normal closes are counted under 1000: {:?}",
        m.samples
            .iter()
            .filter(|s| s.name == "herald_disconnects_total" && s.value > 0.0)
            .collect::<Vec<_>>()
    );
    ensure!(
        m.sum("herald_connections_by_codec") == 0.0,
        "herald_connections_by_codec does not return to 0"
    );
    Ok(())
}

#[tokio::test]
async fn a_wildcard_subscription_counts_once() -> Result<()> {
    let node = Node::start(&["--node-shards", "4"]).await?;
    let mut ws = node.ws().await?;
    ws.sub("w.*").await?;
    wait_metrics(&node, &[("herald_subscriptions", 1.0)]).await?;
    ws.sub("w.>").await?;
    ws.sub("w.exact").await?;
    wait_metrics(&node, &[("herald_subscriptions", 3.0)]).await?;
    // A message matching all three is delivered (and counted) once.
    ws.publish_unacked("w.exact", json!(1)).await?;
    ws.expect_msg("w.exact", &json!(1)).await?;
    ws.expect_nothing(QUIET).await?;
    wait_metrics(&node, &[("herald_messages_out_total", 1.0)]).await?;
    ws.unsub("w.*").await?;
    wait_metrics(&node, &[("herald_subscriptions", 2.0)]).await?;
    ws.close().await?;
    wait_metrics(&node, &[("herald_subscriptions", 0.0)]).await?;
    Ok(())
}

#[tokio::test]
async fn slow_consumers_and_oversize_closes_are_counted() -> Result<()> {
    let node = Node::start(&[
        "--client-outbound-queue",
        "4",
        "--client-max-message-bytes",
        "4096",
    ])
    .await?;
    // 1009: a frame over the limit.
    let mut big = node.ws().await?;
    big.send_json(json!({"op": "pub", "topic": "x.t", "data": "y".repeat(5000)}))
        .await?;
    big.expect_close(1009, WAIT).await?;
    drop(big);
    node.wait_metric_labeled("herald_disconnects_total", ("code", "1009"), WAIT, |v| {
        v == 1.0
    })
    .await?;

    // 4001: a session that never reads while a burst is queued for it.
    let mut slow = node.ws_connect().recv_buffer(4096).connect().await?;
    slow.sub("flood.t").await?;
    let mut publisher = node.ws().await?;
    let data = json!("z".repeat(3000));
    let started = Instant::now();
    loop {
        for _ in 0..20 {
            publisher
                .feed_json(json!({"op": "pub", "topic": "flood.t", "data": data}))
                .await?;
        }
        publisher.flush().await?;
        publisher.assert_alive().await?;
        if node.metrics().await?.sum("herald_slow_consumers_total") >= 1.0 {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(8),
            "herald_slow_consumers_total did not move"
        );
    }
    slow.expect_close(4001, WAIT).await?;
    drop(slow);
    node.wait_metric_labeled("herald_disconnects_total", ("code", "4001"), WAIT, |v| {
        v == 1.0
    })
    .await?;
    let m = node.metrics().await?;
    ensure!(
        m.sum("herald_slow_consumers_total") == 1.0,
        "herald_slow_consumers_total is {}",
        m.sum("herald_slow_consumers_total")
    );
    publisher.close().await
}

/// Opens a session and checks that it is admitted (a ping gets its pong).
async fn open_admitted(node: &Node) -> Result<WsClient> {
    let mut ws = node.ws().await?;
    ws.assert_alive().await?;
    Ok(ws)
}

#[tokio::test]
async fn readyz_is_overloaded_at_the_soft_limit() -> Result<()> {
    let node = Node::start(&["--client-soft-limit", "2"]).await?;
    let first = open_admitted(&node).await?;
    wait_readyz(&node, 200, &[]).await?;
    let mut second = open_admitted(&node).await?;
    wait_readyz(&node, 503, &["overloaded"]).await?;
    // Ready again once below the soft limit.
    first.close().await?;
    wait_readyz(&node, 200, &[]).await?;
    second.assert_alive().await?;
    second.close().await
}

#[tokio::test]
async fn readyz_is_overloaded_at_the_connection_limit() -> Result<()> {
    // The default soft limit (90% of 50000) is far above this cap.
    let node = Node::start(&["--client-max-connections", "2"]).await?;
    let first = open_admitted(&node).await?;
    let _second = open_admitted(&node).await?;
    // The node takes no more clients...
    let mut third = node.ws().await?;
    let (ended, _) = third.wait_end(WAIT).await?;
    ensure!(
        ended == Ended::Close(1013, String::new()),
        "a session over the cap ended with {ended:?}"
    );
    node.wait_metric_labeled(
        "herald_admission_rejections_total",
        ("reason", "connection_limit"),
        WAIT,
        |v| v >= 1.0,
    )
    .await?;
    // ...so it must not say it should get them.
    wait_readyz(&node, 503, &["overloaded"]).await?;
    first.close().await?;
    wait_readyz(&node, 200, &[]).await
}

#[tokio::test]
async fn admin_endpoints_refuse_other_methods_and_paths() -> Result<()> {
    let node = Node::start(&[]).await?;
    for path in ["/metrics", "/healthz", "/readyz", "/v1/cluster"] {
        let resp = cluster_tests::http::request(node.admin_addr(), "POST", path, &[], b"").await?;
        ensure!(resp.status == 405, "POST {path}: {}", resp.status);
    }
    let resp = node.admin_get("/nope").await?;
    ensure!(resp.status == 404, "GET /nope: {}", resp.status);
    // The admin port is not the client port: no WebSocket there.
    let (status, _) = cluster_tests::http::raw_upgrade(node.admin_addr(), "/ws", &[]).await?;
    ensure!(status != 101, "the admin port accepted a WebSocket upgrade");
    let mut ws = node.ws().await?;
    ws.expect_nothing(QUIET).await?;
    ws.close().await
}
