//! HTTP publish on the client port: JSON and binary bodies, replies and
//! error bodies, limits, methods, percent-decoding, and trace headers
//! carried to `msg.trace` / `msg.tracestate`.

use anyhow::{ensure, Result};
use cluster_tests::http::{self, HttpResponse};
use cluster_tests::{b64, mp_bin, Node, QUIET};
use serde_json::{json, Value};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn check_error_body(resp: &HttpResponse, status: u16, code: &str) -> Result<()> {
    ensure!(
        resp.status == status,
        "expected HTTP {status}, got {} {}",
        resp.status,
        resp.text()
    );
    let body = resp.json()?;
    ensure!(
        body["error"] == code && body["message"].is_string(),
        "expected error body {{\"error\": {code:?}, \"message\": ...}}, got {body}"
    );
    Ok(())
}

fn check_ok_body(resp: &HttpResponse, seq: u64) -> Result<String> {
    ensure!(resp.status == 200, "HTTP {}: {}", resp.status, resp.text());
    let body = resp.json()?;
    ensure!(
        body["seq"] == seq && body["epoch"].is_string(),
        "expected {{\"seq\": {seq}, \"epoch\": ...}}, got {body}"
    );
    Ok(body["epoch"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn json_body_is_delivered_as_its_value() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut sub = node.ws().await?;
    let ok = sub.sub("http.t").await?;
    let body = json!({"hello": ["world", 1, null]});
    let resp = node
        .http_publish(
            "http.t",
            Some("application/json"),
            body.to_string().as_bytes(),
            &[],
        )
        .await?;
    let epoch = check_ok_body(&resp, 1)?;
    ensure!(
        ok["epoch"] == epoch.as_str(),
        "epochs differ: sub {ok}, http {epoch}"
    );
    let msg = sub.expect_msg("http.t", &body).await?;
    ensure!(msg["seq"] == 1 && msg.get("b64").is_none(), "{msg}");
    // Parameters and +json types are JSON too; so is a bare scalar or null.
    for (i, (ct, body)) in [
        ("application/json; charset=utf-8", json!("text")),
        ("application/vnd.x+json", json!({"v": 2})),
        ("application/json;charset=utf-8", json!(3)),
        ("application/problem+json; charset=UTF-8", json!(null)),
    ]
    .into_iter()
    .enumerate()
    {
        let resp = node
            .http_publish("http.t", Some(ct), body.to_string().as_bytes(), &[])
            .await?;
        check_ok_body(&resp, i as u64 + 2)?;
        let msg = sub.expect_msg("http.t", &body).await?;
        ensure!(msg.get("b64").is_none(), "{ct}: {msg}");
    }
    sub.close().await
}

#[tokio::test]
async fn other_bodies_are_delivered_as_binary() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut json_sub = node.ws().await?;
    json_sub.sub("bin.http").await?;
    let mut mp_sub = node.ws_msgpack().await?;
    mp_sub.sub("bin.http").await?;
    let cases: [(Option<&str>, &[u8]); 4] = [
        (Some("text/plain"), b"plain text"),
        (Some("application/octet-stream"), &[0, 159, 146, 150, 255]),
        (Some("text/json"), b"{\"not\": \"json type\"}"),
        (None, b"no type"),
    ];
    for (i, (ct, body)) in cases.into_iter().enumerate() {
        let resp = node.http_publish("bin.http", ct, body, &[]).await?;
        check_ok_body(&resp, i as u64 + 1)?;
        let msg = json_sub.expect_msg("bin.http", &json!(b64(body))).await?;
        ensure!(msg["b64"] == true, "{ct:?}: {msg}");
        mp_sub.expect_msg("bin.http", &mp_bin(body)).await?;
    }
    // An empty body is binary data of length 0.
    let resp = node
        .http_publish("bin.http", Some("text/plain"), b"", &[])
        .await?;
    check_ok_body(&resp, 5)?;
    let msg = json_sub.expect_msg("bin.http", &json!("")).await?;
    ensure!(msg["b64"] == true, "{msg}");
    json_sub.close().await?;
    mp_sub.close().await
}

#[tokio::test]
async fn bad_requests_get_error_bodies() -> Result<()> {
    let node = Node::start(&["--client-max-message-bytes", "1024"]).await?;
    let mut sub = node.ws().await?;
    sub.sub(">").await?;
    let json_ct = Some("application/json");
    // A client percent-encodes `>` (a raw one is not a valid URI character).
    for topic in ["a..b", "a.*", "a.%3E", ".a", "a%20b", "a%2Fb"] {
        let resp = node.http_publish(topic, json_ct, b"1", &[]).await?;
        check_error_body(&resp, 400, "bad_request").map_err(|e| e.context(topic.to_owned()))?;
    }
    let long = "t".repeat(256);
    let resp = node.http_publish(&long, json_ct, b"1", &[]).await?;
    check_error_body(&resp, 400, "limit_exceeded")?;
    // The last two are JSON that MessagePack subscribers could not be
    // given: a number past f64 and a lone surrogate.
    for body in [
        &b"{bad json"[..],
        b"",
        b"[1,",
        b"\xff\xfe",
        b"1e400",
        br#"["\udfff"]"#,
    ] {
        let resp = node.http_publish("json.t", json_ct, body, &[]).await?;
        check_error_body(&resp, 400, "bad_request")
            .map_err(|e| e.context(String::from_utf8_lossy(body).into_owned()))?;
    }
    let big = vec![b'a'; 2000];
    let resp = node
        .http_publish("big.t", Some("text/plain"), &big, &[])
        .await?;
    check_error_body(&resp, 413, "too_large")?;
    let big_json = format!("\"{}\"", "j".repeat(2000));
    let resp = node
        .http_publish("big.t", json_ct, big_json.as_bytes(), &[])
        .await?;
    check_error_body(&resp, 413, "too_large")?;
    // None of these was published.
    sub.expect_nothing(QUIET).await?;
    // And the node still publishes.
    let resp = node.http_publish("ok.t", json_ct, b"1", &[]).await?;
    check_ok_body(&resp, 1)?;
    sub.expect_msg("ok.t", &json!(1)).await?;
    sub.close().await
}

#[tokio::test]
async fn methods_other_than_post_get_405() -> Result<()> {
    let node = Node::start(&[]).await?;
    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        let resp = http::request(
            node.client_addr(),
            method,
            "/v1/publish/m.t",
            &[("Content-Type", "application/json")],
            if method == "GET" || method == "DELETE" {
                b""
            } else {
                b"1"
            },
        )
        .await?;
        ensure!(resp.status == 405, "{method}: HTTP {}", resp.status);
    }
    Ok(())
}

#[tokio::test]
async fn topic_in_the_path_is_percent_decoded() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut sub = node.ws().await?;
    sub.sub("pct.>").await?;
    let resp = node
        .http_publish("pct%2Ea%3Ab", Some("application/json"), b"\"x\"", &[])
        .await?;
    check_ok_body(&resp, 1)?;
    sub.expect_msg("pct.a:b", &json!("x")).await?;
    let resp = node
        .http_publish("pct.%41%5f-", Some("application/json"), b"\"y\"", &[])
        .await?;
    check_ok_body(&resp, 1)?;
    sub.expect_msg("pct.A_-", &json!("y")).await?;
    sub.close().await
}

#[tokio::test]
async fn http_seq_follows_websocket_seq() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut ws = node.ws().await?;
    let (_, epoch) = ws.publish("shared.t", json!(1)).await?;
    let resp = node
        .http_publish("shared.t", Some("application/json"), b"2", &[])
        .await?;
    ensure!(check_ok_body(&resp, 2)? == epoch);
    let (seq, _) = ws.publish("shared.t", json!(3)).await?;
    ensure!(seq == 3);
    ws.close().await
}

#[tokio::test]
async fn trace_headers_are_carried_with_the_message() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut sub = node.ws().await?;
    sub.sub("trace.t").await?;
    let state = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";
    let resp = node
        .http_publish(
            "trace.t",
            Some("application/json"),
            b"1",
            &[("traceparent", TRACEPARENT), ("tracestate", state)],
        )
        .await?;
    check_ok_body(&resp, 1)?;
    let msg = sub.expect_msg("trace.t", &json!(1)).await?;
    check_trace(&msg, TRACE_ID, "01")?;
    ensure!(msg["tracestate"] == state, "tracestate not verbatim: {msg}");
    // The sampled flag is kept as given.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let resp = node
        .http_publish(
            "trace.t",
            Some("text/plain"),
            b"raw",
            &[("traceparent", unsampled)],
        )
        .await?;
    check_ok_body(&resp, 2)?;
    let msg = sub.recv().await?;
    check_trace(&msg, "0af7651916cd43dd8448eb211c80319c", "00")?;
    // An invalid traceparent is ignored: still published, its id not kept.
    let resp = node
        .http_publish(
            "trace.t",
            Some("application/json"),
            b"3",
            &[("traceparent", "00-XYZ-123-01")],
        )
        .await?;
    check_ok_body(&resp, 3)?;
    let msg = sub.expect_msg("trace.t", &json!(3)).await?;
    ensure!(
        msg.get("trace")
            .is_none_or(|t| t.is_string() && !t.as_str().unwrap_or_default().contains("XYZ")),
        "{msg}"
    );
    sub.close().await
}

/// `msg.trace` is a traceparent with the publisher's trace id and flags.
fn check_trace(msg: &Value, trace_id: &str, flags: &str) -> Result<()> {
    let trace = msg["trace"].as_str().unwrap_or_default();
    let parts: Vec<&str> = trace.split('-').collect();
    ensure!(
        parts.len() == 4 && parts[0] == "00" && parts[1] == trace_id && parts[2].len() == 16,
        "msg.trace should carry trace id {trace_id}: {msg}"
    );
    ensure!(parts[3] == flags, "sampled flag {flags} not kept: {msg}");
    Ok(())
}

#[tokio::test]
async fn websocket_trace_fields_are_carried_with_the_message() -> Result<()> {
    let node = Node::start(&[]).await?;
    let mut sub = node.ws().await?;
    sub.sub("wstrace.t").await?;
    let mut mp_sub = node.ws_msgpack().await?;
    mp_sub.sub("wstrace.t").await?;
    let mut publisher = node.ws().await?;
    publisher
        .send_json(json!({
            "op": "pub", "id": 1, "topic": "wstrace.t", "data": "t",
            "trace": TRACEPARENT, "tracestate": "a=1,b=2"
        }))
        .await?;
    publisher.expect_ok(1).await?;
    for ws in [&mut sub, &mut mp_sub] {
        let msg = ws.expect_msg("wstrace.t", &json!("t")).await?;
        check_trace(&msg, TRACE_ID, "01")?;
        ensure!(msg["tracestate"] == "a=1,b=2", "{msg}");
    }
    // An invalid trace is ignored, not an error.
    publisher
        .send_json(
            json!({"op": "pub", "id": 2, "topic": "wstrace.t", "data": "u", "trace": "garbage"}),
        )
        .await?;
    publisher.expect_ok(2).await?;
    let msg = sub.expect_msg("wstrace.t", &json!("u")).await?;
    ensure!(
        msg.get("trace")
            .is_none_or(|t| t.is_string() && t != "garbage"),
        "{msg}"
    );
    Ok(())
}
