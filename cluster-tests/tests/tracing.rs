//! Distributed tracing end to end: a 3-node cluster exporting spans over
//! OTLP (http/protobuf, and gRPC) to a receiver in the test. One traced
//! publish must make ONE
//! trace: `herald.publish` on the node that took it (child of the client's
//! span), `herald.sequence` on the topic's owner (child of the publish),
//! and a `herald.deliver` on every node with a subscriber (children of the
//! sequence); each delivered `msg` names its node's deliver span as parent.
//! The JSON log lines of a traced node name the node, the session and the
//! message's trace they are about.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cluster_tests::otlp::{describe, OtlpProtocol, OtlpReceiver, ReceivedSpan};
use cluster_tests::{Cluster, Node, WsClient, QUIET};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::{json, Value};

/// Spans are batched every 100 ms; allow for slow machines.
const SPANS_TIMEOUT: Duration = Duration::from_secs(20);

async fn traced_cluster(receiver: &OtlpReceiver, protocol: OtlpProtocol) -> Result<Cluster> {
    let endpoint = receiver.endpoint();
    Cluster::start(3, |b| {
        b.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.env_value())
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("OTEL_TRACES_SAMPLER_ARG", "1.0")
    })
    .await
}

/// Random-enough hex ids for a test (distinct per call and per process).
fn fresh_ids() -> (String, String) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let trace = format!(
        "{:016x}{:016x}",
        nanos ^ u64::from(std::process::id()),
        n | 0x1000
    );
    let span = format!("{:016x}", nanos.rotate_left(17) ^ n | 1);
    (trace, span)
}

/// The node owning `topic`, from `herald_topics` ("topics this node
/// owns"): in a fresh cluster, after subscribes, only the owner has any.
async fn owner_of(cluster: &Cluster) -> Result<Option<usize>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut owning = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            if node.metrics().await?.sum("herald_topics") > 0.0 {
                owning.push(i);
            }
        }
        match owning.as_slice() {
            [one] => return Ok(Some(*one)),
            [] if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => return Ok(None),
        }
    }
}

async fn subscribe_everywhere(cluster: &Cluster, topic: &str) -> Result<Vec<WsClient>> {
    let mut subscribers = Vec::new();
    for node in &cluster.nodes {
        let mut ws = node.ws().await?;
        ws.sub(topic).await?;
        subscribers.push(ws);
    }
    Ok(subscribers)
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> Result<&'a ReceivedSpan> {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == name).collect();
    match found.as_slice() {
        [span] => Ok(span),
        _ => bail!(
            "expected one {name} span, found {}:\n{}",
            found.len(),
            describe(spans)
        ),
    }
}

/// Warnings and errors of the OpenTelemetry crates in a node's (text) log:
/// an export that failed, or a reply the exporter did not accept.
fn export_failures(node: &Node) -> Vec<String> {
    node.log()
        .lines()
        .filter(|l| l.contains("opentelemetry") && (l.contains("WARN") || l.contains("ERROR")))
        .map(str::to_owned)
        .collect()
}

fn count(spans: &[ReceivedSpan], name: &str) -> usize {
    spans.iter().filter(|s| s.name == name).count()
}

#[tokio::test]
async fn one_publish_makes_one_trace_across_the_cluster() -> Result<()> {
    one_publish_one_trace(OtlpProtocol::HttpProtobuf).await
}

#[tokio::test]
async fn one_publish_makes_one_trace_exported_over_grpc() -> Result<()> {
    one_publish_one_trace(OtlpProtocol::Grpc).await
}

/// Subscribers on every node, one traced publish on a node that does not
/// own the topic, spans exported with `protocol`: the trace of 5 spans
/// described at the top, every one of them received over `protocol`.
async fn one_publish_one_trace(protocol: OtlpProtocol) -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let cluster = traced_cluster(&receiver, protocol).await?;
    let topic = "traced.orders";
    let mut subscribers = subscribe_everywhere(&cluster, topic).await?;

    // Publish on a node that does not own the topic, so that every hop
    // crosses a node boundary.
    let owner = owner_of(&cluster).await?;
    let ingress = match owner {
        Some(o) => (o + 1) % cluster.nodes.len(),
        None => {
            eprintln!("could not tell the topic's owner from herald_topics; publishing on n1");
            0
        }
    };
    let ingress_node: &Node = &cluster.nodes[ingress];

    let (trace_id, client_span) = fresh_ids();
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let tracestate = "herald-test=t61rcWkgMzE,other=1";
    let data = json!({"order": 1});
    let mut publisher = ingress_node.ws().await?;
    publisher
        .send_json(json!({"op": "pub", "id": 1, "topic": topic, "data": data,
                          "trace": traceparent, "tracestate": tracestate}))
        .await?;
    let ok = publisher.expect_ok(1).await?;
    let seq = ok["seq"].as_u64().context("ok.seq")?;

    let mut msgs: Vec<Value> = Vec::new();
    for ws in &mut subscribers {
        msgs.push(ws.expect_msg(topic, &data).await?);
    }

    let spans = receiver
        .wait_for(
            "publish, sequence and 3 deliver spans",
            SPANS_TIMEOUT,
            |all| {
                let trace: Vec<ReceivedSpan> = all
                    .iter()
                    .filter(|s| s.trace_id == trace_id)
                    .cloned()
                    .collect();
                count(&trace, "herald.publish") >= 1
                    && count(&trace, "herald.sequence") >= 1
                    && count(&trace, "herald.deliver") >= 3
            },
        )
        .await?;
    // Nothing more of this trace should straggle in.
    tokio::time::sleep(QUIET).await;
    // The receiver's answers were understood: no exporter complained.
    for node in &cluster.nodes {
        let failures = export_failures(node);
        ensure!(
            failures.is_empty(),
            "node {} logged export failures over {}:\n{}",
            node.id(),
            protocol.env_value(),
            failures.join("\n")
        );
    }
    let trace = receiver.trace(&trace_id);
    let others: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id != trace_id && s.name.starts_with("herald."))
        .collect();
    ensure!(
        others.is_empty(),
        "herald spans outside the publisher's trace:\n{}",
        describe(&others.into_iter().cloned().collect::<Vec<_>>())
    );
    ensure!(
        trace.len() == 5,
        "expected 5 spans in the trace, got {}:\n{}",
        trace.len(),
        describe(&trace)
    );

    let publish = one(&trace, "herald.publish")?;
    ensure!(
        publish.parent_span_id == client_span,
        "publish's parent is {}, not the client's span {client_span}",
        publish.parent_span_id
    );
    ensure!(
        publish.instance_id() == Some(ingress_node.id()),
        "publish span from {:?}, published on {}",
        publish.instance_id(),
        ingress_node.id()
    );
    ensure!(
        publish.kind == SpanKind::Producer,
        "publish kind {:?}",
        publish.kind
    );

    let sequence = one(&trace, "herald.sequence")?;
    ensure!(
        sequence.parent_span_id == publish.span_id,
        "sequence's parent is {}, not the publish span {}",
        sequence.parent_span_id,
        publish.span_id
    );
    if let Some(owner) = owner {
        ensure!(
            sequence.instance_id() == Some(cluster.nodes[owner].id()),
            "sequence span from {:?}, but {} owns the topic",
            sequence.instance_id(),
            cluster.nodes[owner].id()
        );
    }
    ensure!(
        sequence.attribute("seq") == Some(seq.to_string().as_str()),
        "sequence span's seq {:?}, ok.seq {seq}",
        sequence.attribute("seq")
    );

    let delivers: Vec<&ReceivedSpan> = trace
        .iter()
        .filter(|s| s.name == "herald.deliver")
        .collect();
    let deliver_nodes: BTreeSet<&str> = delivers.iter().filter_map(|s| s.instance_id()).collect();
    let all_nodes: BTreeSet<&str> = cluster.nodes.iter().map(Node::id).collect();
    ensure!(
        deliver_nodes == all_nodes,
        "deliver spans from {deliver_nodes:?}, subscribers on {all_nodes:?}"
    );
    for deliver in &delivers {
        ensure!(
            deliver.parent_span_id == sequence.span_id,
            "deliver on {:?} has parent {}, not the sequence span {}",
            deliver.instance_id(),
            deliver.parent_span_id,
            sequence.span_id
        );
        ensure!(
            deliver.kind == SpanKind::Consumer,
            "deliver kind {:?}",
            deliver.kind
        );
    }

    for span in &trace {
        ensure!(
            span.protocol == protocol,
            "{} from {:?} arrived over {}, the nodes were told to use {}",
            span.name,
            span.instance_id(),
            span.protocol.env_value(),
            protocol.env_value()
        );
        ensure!(
            span.service_name() == Some("herald"),
            "service.name {:?}",
            span.service_name()
        );
        ensure!(
            span.attribute("topic") == Some(topic),
            "{} topic attribute {:?}",
            span.name,
            span.attribute("topic")
        );
        ensure!(
            span.attribute("node_id") == span.instance_id(),
            "{} node_id attribute {:?} on {:?}",
            span.name,
            span.attribute("node_id"),
            span.instance_id()
        );
        ensure!(
            span.trace_state == tracestate,
            "{} trace state {:?}, sent {tracestate:?}",
            span.name,
            span.trace_state
        );
    }

    // Each msg names its own node's deliver span.
    for (node, msg) in cluster.nodes.iter().zip(&msgs) {
        let deliver = delivers
            .iter()
            .find(|s| s.instance_id() == Some(node.id()))
            .ok_or_else(|| anyhow!("no deliver span on {}", node.id()))?;
        let want = format!("00-{trace_id}-{}-01", deliver.span_id);
        ensure!(
            msg["trace"] == want.as_str(),
            "msg on {} carries trace {}, want {want}",
            node.id(),
            msg["trace"]
        );
        ensure!(
            msg["tracestate"] == tracestate,
            "msg on {} carries tracestate {}, sent {tracestate:?}",
            node.id(),
            msg["tracestate"]
        );
    }
    Ok(())
}

#[tokio::test]
async fn untraced_and_unsampled_publishes() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let cluster = traced_cluster(&receiver, OtlpProtocol::HttpProtobuf).await?;
    let topic = "traced.misc";
    let mut subscribers = subscribe_everywhere(&cluster, topic).await?;
    let mut publisher = cluster.nodes[1].ws().await?;

    // Without a trace: a new trace starts at the publish span (a root).
    let data = json!("untraced");
    publisher
        .send_json(json!({"op": "pub", "id": 1, "topic": topic, "data": data}))
        .await?;
    publisher.expect_ok(1).await?;
    let mut trace_ids = BTreeSet::new();
    let mut parents = Vec::new();
    for ws in &mut subscribers {
        let msg = ws.expect_msg(topic, &data).await?;
        let trace = msg["trace"]
            .as_str()
            .ok_or_else(|| anyhow!("msg without trace while tracing is on: {msg}"))?;
        let parts: Vec<&str> = trace.split('-').collect();
        ensure!(parts.len() == 4 && parts[3] == "01", "msg trace {trace}");
        trace_ids.insert(parts[1].to_owned());
        parents.push(parts[2].to_owned());
    }
    ensure!(
        trace_ids.len() == 1,
        "one message, several traces: {trace_ids:?}"
    );
    let trace_id = trace_ids.into_iter().next().expect("one");
    let spans = receiver
        .wait_for("a new trace of 5 spans", SPANS_TIMEOUT, |all| {
            all.iter().filter(|s| s.trace_id == trace_id).count() >= 5
        })
        .await?;
    let trace: Vec<ReceivedSpan> = spans
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect();
    let publish = one(&trace, "herald.publish")?;
    ensure!(
        publish.parent_span_id.is_empty(),
        "an untraced publish should be a root, parent {}",
        publish.parent_span_id
    );
    for parent in &parents {
        ensure!(
            trace
                .iter()
                .any(|s| s.name == "herald.deliver" && &s.span_id == parent),
            "msg parent {parent} is no deliver span of the trace:\n{}",
            describe(&trace)
        );
    }

    // Not sampled by the client: no span anywhere, and the msgs carry the
    // client's context on, still not sampled.
    let (trace_id, client_span) = fresh_ids();
    let traceparent = format!("00-{trace_id}-{client_span}-00");
    let data = json!("unsampled");
    publisher
        .send_json(
            json!({"op": "pub", "id": 2, "topic": topic, "data": data, "trace": traceparent}),
        )
        .await?;
    publisher.expect_ok(2).await?;
    for ws in &mut subscribers {
        let msg = ws.expect_msg(topic, &data).await?;
        ensure!(
            msg["trace"] == traceparent.as_str(),
            "unsampled msg carries {}, want {traceparent}",
            msg["trace"]
        );
    }
    // Give a batch or two the chance to (wrongly) carry it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stray = receiver.trace(&trace_id);
    ensure!(
        stray.is_empty(),
        "spans exported for an unsampled trace:\n{}",
        describe(&stray)
    );
    Ok(())
}

#[tokio::test]
async fn spans_still_queued_are_flushed_at_shutdown() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    // A batch delay far beyond the test: only the shutdown flush sends.
    let mut node = cluster_tests::NodeBuilder::new("solo")
        .args(["--node-drain-grace", "200ms"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env(
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            OtlpProtocol::HttpProtobuf.env_value(),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .env("OTEL_SERVICE_NAME", "herald-solo")
        .start()
        .await?;
    let (trace_id, client_span) = fresh_ids();
    let mut ws = node.ws().await?;
    ws.send_json(json!({"op": "pub", "id": 1, "topic": "flush.me", "data": 1,
                        "trace": format!("00-{trace_id}-{client_span}-01")}))
        .await?;
    ws.expect_ok(1).await?;
    tokio::time::sleep(QUIET).await;
    ensure!(
        receiver.trace(&trace_id).is_empty(),
        "spans were exported before the batch delay or shutdown"
    );
    node.sigterm()?;
    let status = node.wait_exit(Duration::from_secs(15)).await?;
    ensure!(status.success(), "herald exited with {status}");
    let spans = receiver
        .wait_for(
            "the publish and sequence spans",
            Duration::from_secs(5),
            |all| {
                let names: BTreeSet<&str> = all
                    .iter()
                    .filter(|s| s.trace_id == trace_id)
                    .map(|s| s.name.as_str())
                    .collect();
                names.contains("herald.publish") && names.contains("herald.sequence")
            },
        )
        .await?;
    let publish = one(&spans, "herald.publish")?;
    ensure!(publish.parent_span_id == client_span, "publish parent");
    ensure!(
        publish.service_name() == Some("herald-solo") && publish.instance_id() == Some("solo"),
        "resource {:?}",
        publish.resource
    );
    Ok(())
}

/// The node's combined output, one JSON object per line: the lines that
/// do not parse are an error.
fn json_log_lines(node: &Node) -> Result<Vec<serde_json::Map<String, Value>>> {
    node.log()
        .lines()
        .enumerate()
        .map(|(i, line)| match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(fields)) => Ok(fields),
            _ => bail!("log line {} is not a JSON object: {line}", i + 1),
        })
        .collect()
}

#[tokio::test]
async fn json_log_lines_name_their_node_session_and_trace() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let node = cluster_tests::NodeBuilder::new("logs")
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info,node=debug")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await?;
    let topic = "logged.orders";
    let (trace_id, client_span) = fresh_ids();
    let data = json!({"order": 7});
    let mut ws = node.ws().await?;
    ws.sub(topic).await?;
    ws.send_json(json!({"op": "pub", "id": 1, "topic": topic, "data": data,
                        "trace": format!("00-{trace_id}-{client_span}-01")}))
        .await?;
    ws.expect_ok(1).await?;
    ws.expect_msg(topic, &data).await?;
    ws.close().await?;
    // The trace was exported, and the session is over (its last line is
    // logged right after the gauge falls).
    receiver
        .wait_for("the message's spans", SPANS_TIMEOUT, |all| {
            all.iter()
                .any(|s| s.trace_id == trace_id && s.name == "herald.deliver")
        })
        .await?;
    node.wait_metric("herald_connections", Duration::from_secs(5), |n| n == 0.0)
        .await?;
    tokio::time::sleep(QUIET).await;

    let lines = json_log_lines(&node)?;
    let shown = |lines: &[&serde_json::Map<String, Value>]| {
        lines
            .iter()
            .map(|l| Value::Object((*l).clone()).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    for line in &lines {
        for key in ["timestamp", "level", "target"] {
            ensure!(
                line.get(key).is_some_and(Value::is_string),
                "log line without {key}: {}",
                shown(&[line])
            );
        }
    }

    // About the session: logged in its span, or naming it.
    let session: Vec<&serde_json::Map<String, Value>> = lines
        .iter()
        .filter(|l| {
            l.contains_key("session_id")
                || l.get("span").is_some_and(|s| s == "session")
                || l.get("message")
                    .and_then(Value::as_str)
                    .is_some_and(|m| m.starts_with("session"))
        })
        .collect();
    ensure!(
        session.len() >= 2,
        "fewer than 2 lines about the session (opened, closed) at debug:\n{}",
        shown(&session)
    );
    let missing: Vec<&serde_json::Map<String, Value>> = session
        .iter()
        .copied()
        .filter(|l| l.get("node_id") != Some(&json!("logs")) || !l["session_id"].is_u64())
        .collect();
    ensure!(
        missing.is_empty(),
        "lines about the session without node_id \"logs\" or a numeric session_id:\n{}",
        shown(&missing)
    );
    let ids: BTreeSet<u64> = session
        .iter()
        .filter_map(|l| l["session_id"].as_u64())
        .collect();
    ensure!(ids.len() == 1, "one session, session ids {ids:?}");

    // About the message: logged in one of its spans, or naming its topic.
    let message: Vec<&serde_json::Map<String, Value>> = lines
        .iter()
        .filter(|l| {
            l.get("topic").is_some_and(|t| t == topic)
                || l.get("span")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.starts_with("herald."))
        })
        .collect();
    ensure!(
        message
            .iter()
            .any(|l| l.get("trace_id").is_some_and(|t| *t == trace_id)),
        "no line about the message carries trace_id {trace_id}; lines about it:\n{}",
        shown(&message)
    );
    let other_traces: Vec<&serde_json::Map<String, Value>> = lines
        .iter()
        .filter(|l| l.get("trace_id").is_some_and(|t| *t != trace_id))
        .collect();
    ensure!(
        other_traces.is_empty(),
        "one traced message, yet lines with another trace_id:\n{}",
        shown(&other_traces)
    );
    Ok(())
}
