//! JWT auth: the token at the upgrade (header or query), refusals with 401,
//! per-topic grants (`forbidden` on the session, 403 over HTTP), expiry
//! (close 1008), and RS256 public keys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use cluster_tests::http::raw_upgrade;
use cluster_tests::jwt::{grant, now_secs, token};
use cluster_tests::{HttpResponse, Node, WsClient, WsConnect, QUIET};
use serde_json::{json, Value};

const SECRET: &str = "herald-test-secret";

async fn auth_node() -> Result<Node> {
    Node::start(&["--auth-hs256-secret", SECRET]).await
}

/// An HTTP error reply: this status and `{"error": code, "message": text}`.
fn check_error_body(resp: &HttpResponse, status: u16, code: &str) -> Result<()> {
    ensure!(
        resp.status == status,
        "expected HTTP {status}, got {} {:?}",
        resp.status,
        resp.text()
    );
    let body = resp.json()?;
    ensure!(
        body["error"] == code && body["message"].is_string(),
        "expected error body with code {code}, got {body}"
    );
    Ok(())
}

/// The status of an upgrade attempt: 101 when a session opened.
async fn upgrade_status(connect: WsConnect) -> Result<u16> {
    Ok(match connect.try_connect().await? {
        Ok(ws) => {
            ws.close().await?;
            101
        }
        Err(refusal) => refusal.status,
    })
}

/// `alg: none`, unsigned.
fn unsigned_token(claims: &Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        b64.encode(claims.to_string())
    )
}

#[tokio::test]
async fn upgrade_without_a_token_is_refused_with_401() -> Result<()> {
    let node = auth_node().await?;
    let status = upgrade_status(node.ws_connect()).await?;
    ensure!(status == 401, "upgrade without a token: HTTP {status}");
    // The raw answer too (no session, no 101 first).
    let (status, _) = raw_upgrade(node.client_addr(), "/ws", &[]).await?;
    ensure!(status == 401, "raw upgrade without a token: HTTP {status}");
    // An empty query token or an Authorization header of another scheme is
    // no token either.
    let status = upgrade_status(node.ws_connect().path("/ws?token=")).await?;
    ensure!(status == 401, "empty ?token=: HTTP {status}");
    let basic = node
        .ws_connect()
        .header("Authorization", "Basic dXNlcjpwYXNz");
    let status = upgrade_status(basic).await?;
    ensure!(status == 401, "Authorization: Basic: HTTP {status}");
    // No session was ever opened: nothing is subscribed.
    let metrics = node.metrics().await?;
    for name in [
        "herald_connects_total",
        "herald_connections",
        "herald_subscriptions",
    ] {
        let value = metrics.sum(name);
        ensure!(value == 0.0, "{name} is {value} after refused upgrades");
    }
    Ok(())
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401() -> Result<()> {
    let node = auth_node().await?;
    let claims = json!({"exp": now_secs() + 3600, "publish": [">"], "subscribe": [">"]});
    let good = token(SECRET, &claims);
    let mut tampered = good.clone();
    // Flip one character of the signature.
    let last = tampered.pop().expect("non-empty token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let expired = token(SECRET, &json!({"exp": now_secs() - 60, "subscribe": [">"]}));
    let cases = [
        (
            "signed with another secret",
            token("not-the-secret", &claims),
        ),
        ("tampered signature", tampered),
        ("not a JWT", "garbage".to_owned()),
        ("alg none", unsigned_token(&claims)),
        ("expired", expired),
        (
            "an invalid pattern in the claims",
            token(SECRET, &json!({"subscribe": ["a..b"]})),
        ),
        (
            "claims of the wrong type",
            token(SECRET, &json!({"publish": "news.>"})),
        ),
    ];
    for (what, bad) in &cases {
        let status = upgrade_status(node.ws_connect().bearer(bad)).await?;
        ensure!(status == 401, "{what} (header): HTTP {status}");
        let status = upgrade_status(node.ws_connect().token_query(bad)).await?;
        ensure!(status == 401, "{what} (query): HTTP {status}");
    }
    ensure!(
        node.metrics().await?.sum("herald_connects_total") == 0.0,
        "a session was opened with a bad token"
    );
    // The good one works.
    let status = upgrade_status(node.ws_connect().bearer(&good)).await?;
    ensure!(status == 101, "good token: HTTP {status}");
    Ok(())
}

/// Subscribes on `sub`, publishes on `publisher`, and checks delivery.
async fn round_trip(sub: &mut WsClient, publisher: &mut WsClient, topic: &str) -> Result<()> {
    sub.sub(topic).await?;
    publisher.publish(topic, json!({"via": topic})).await?;
    sub.expect_msg(topic, &json!({"via": topic})).await?;
    Ok(())
}

#[tokio::test]
async fn token_in_the_header_or_the_query_both_work() -> Result<()> {
    let node = auth_node().await?;
    let tok = grant(SECRET, &["room.>"], &["room.>"]);
    let mut by_header = node.ws_connect().bearer(&tok).connect().await?;
    let mut by_query = node.ws_connect().token_query(&tok).connect().await?;
    round_trip(&mut by_header, &mut by_query, "room.a").await?;
    round_trip(&mut by_query, &mut by_header, "room.b").await?;
    // With msgpack as well, and the header scheme is case-insensitive.
    let mut mp = node
        .ws_connect()
        .subprotocol(cluster_tests::MSGPACK)
        .header("Authorization", &format!("bearer {tok}"))
        .connect()
        .await?;
    ensure!(mp.codec() == cluster_tests::Codec::Msgpack, "not msgpack");
    round_trip(&mut mp, &mut by_header, "room.c").await?;
    // A token with neither exp nor grants is valid but allows nothing.
    let bare = token(SECRET, &json!({}));
    let mut nothing = node.ws_connect().bearer(&bare).connect().await?;
    nothing.assert_alive().await?;
    nothing
        .send_json(json!({"op": "sub", "id": 1, "topic": "room.a"}))
        .await?;
    nothing.expect_err(Some(1), "forbidden").await?;
    by_header.close().await?;
    by_query.close().await?;
    mp.close().await?;
    nothing.close().await
}

#[tokio::test]
async fn topics_outside_the_claims_are_forbidden_and_the_session_goes_on() -> Result<()> {
    let node = auth_node().await?;
    let limited = grant(SECRET, &["news.>", "chat.room1"], &["news.*"]);
    let mut ws = node.ws_connect().bearer(&limited).connect().await?;
    // A watcher that may see everything, to prove nothing leaks through.
    let all = grant(SECRET, &[">"], &[">"]);
    let mut watcher = node.ws_connect().bearer(&all).connect().await?;
    watcher.sub(">").await?;

    // sub: patterns not covered by `news.*`.
    for (id, topic) in [
        (1u64, "chat.room1"),
        (2, "news.>"),
        (3, "news.*.x"),
        (4, ">"),
        (5, "news.a.b"),
        (6, "*.a"),
    ] {
        ws.send_json(json!({"op": "sub", "id": id, "topic": topic}))
            .await?;
        ws.expect_err(Some(id), "forbidden")
            .await
            .with_context(|| format!("sub {topic}"))?;
    }
    // With a group, too.
    ws.send_json(json!({"op": "sub", "id": 7, "topic": "chat.room1", "group": "g"}))
        .await?;
    ws.expect_err(Some(7), "forbidden").await?;
    // pub: topics not matched by `news.>` or `chat.room1`.
    for (id, topic) in [(11u64, "chat.room2"), (12, "news"), (13, "other.t")] {
        ws.send_json(json!({"op": "pub", "id": id, "topic": topic, "data": 1}))
            .await?;
        ws.expect_err(Some(id), "forbidden")
            .await
            .with_context(|| format!("pub {topic}"))?;
    }
    // A pub without an id still gets its err (with a null id).
    ws.publish_unacked("chat.room2", json!("sneaky")).await?;
    ws.expect_err(None, "forbidden").await?;
    // In an array frame, the forbidden element fails alone.
    ws.send_json(json!([
        {"op": "pub", "id": 21, "topic": "other.t", "data": 2},
        {"op": "ping", "id": 22},
    ]))
    .await?;
    ws.expect_err(Some(21), "forbidden").await?;
    ws.expect_pong(22).await?;
    ws.expect_nothing(QUIET).await?;
    // Nothing forbidden was delivered.
    watcher.expect_nothing(QUIET).await?;

    // The session still works, within its grants.
    ws.assert_alive().await?;
    ws.sub("news.sport").await?;
    ws.sub("news.*").await?;
    let (seq, _) = ws.publish("chat.room1", json!("hello")).await?;
    ensure!(
        seq == 1,
        "first allowed publish to chat.room1 has seq {seq}"
    );
    watcher.expect_msg("chat.room1", &json!("hello")).await?;
    watcher.publish("news.sport", json!("goal")).await?;
    ws.expect_msg("news.sport", &json!("goal")).await?;
    watcher.expect_msg("news.sport", &json!("goal")).await?;
    // Forbidden topics were never sequenced.
    let (seq, _) = watcher.publish("chat.room2", json!("x")).await?;
    ensure!(seq == 1, "chat.room2 had earlier messages: seq {seq}");
    watcher.expect_msg("chat.room2", &json!("x")).await?;
    ws.expect_nothing(QUIET).await?;
    ws.close().await?;
    watcher.close().await
}

#[tokio::test]
async fn http_publish_checks_the_token() -> Result<()> {
    let node = auth_node().await?;
    let all = grant(SECRET, &[">"], &[">"]);
    let mut watcher = node.ws_connect().bearer(&all).connect().await?;
    watcher.sub(">").await?;
    let json_ct = Some("application/json");

    let resp = node.http_publish("h.t", json_ct, b"1", &[]).await?;
    check_error_body(&resp, 401, "unauthorized").context("no token")?;
    let bad = format!("Bearer {}", token("wrong", &json!({"publish": [">"]})));
    let resp = node
        .http_publish("h.t", json_ct, b"1", &[("Authorization", &bad)])
        .await?;
    check_error_body(&resp, 401, "unauthorized").context("bad signature")?;
    let resp = node
        .http_publish("h.t?token=garbage", json_ct, b"1", &[])
        .await?;
    check_error_body(&resp, 401, "unauthorized").context("garbage query token")?;
    let expired = token(SECRET, &json!({"exp": now_secs() - 60, "publish": [">"]}));
    let resp = node
        .http_publish(
            "h.t",
            json_ct,
            b"1",
            &[("Authorization", &format!("Bearer {expired}"))],
        )
        .await?;
    check_error_body(&resp, 401, "unauthorized").context("expired token")?;

    // Valid, but not for this topic (subscribe grants do not count).
    let other = grant(SECRET, &["other.>"], &["h.>"]);
    let resp = node
        .http_publish(
            "h.t",
            json_ct,
            b"1",
            &[("Authorization", &format!("Bearer {other}"))],
        )
        .await?;
    check_error_body(&resp, 403, "forbidden").context("topic not granted")?;
    let resp = node
        .http_publish(&format!("h.t?token={other}"), json_ct, b"1", &[])
        .await?;
    check_error_body(&resp, 403, "forbidden").context("topic not granted (query)")?;
    watcher.expect_nothing(QUIET).await?;

    // Allowed: by header, then by query.
    let allowed = grant(SECRET, &["h.*"], &[]);
    let resp = node
        .http_publish(
            "h.t",
            json_ct,
            b"{\"n\":1}",
            &[("Authorization", &format!("Bearer {allowed}"))],
        )
        .await?;
    ensure!(
        resp.status == 200,
        "allowed publish: {} {}",
        resp.status,
        resp.text()
    );
    ensure!(
        resp.json()?["seq"] == 1,
        "refused publishes were sequenced: {}",
        resp.text()
    );
    watcher.expect_msg("h.t", &json!({"n": 1})).await?;
    let resp = node
        .http_publish(&format!("h.t?token={allowed}"), json_ct, b"2", &[])
        .await?;
    ensure!(
        resp.status == 200,
        "allowed publish (query): {} {}",
        resp.status,
        resp.text()
    );
    ensure!(resp.json()?["seq"] == 2, "{}", resp.text());
    watcher.expect_msg("h.t", &json!(2)).await?;
    watcher.close().await
}

#[tokio::test]
async fn session_is_closed_with_1008_when_the_token_expires() -> Result<()> {
    let node = auth_node().await?;
    let exp = now_secs() + 2;
    let short = token(
        SECRET,
        &json!({"exp": exp, "publish": ["exp.>"], "subscribe": ["exp.>"]}),
    );
    let long = grant(SECRET, &["exp.>"], &["exp.>"]);
    let started = Instant::now();
    let mut expiring = node.ws_connect().bearer(&short).connect().await?;
    let mut lasting = node.ws_connect().bearer(&long).connect().await?;
    expiring.sub("exp.t").await?;
    lasting.sub("exp.t").await?;
    // Works while the token is valid.
    expiring.publish("exp.t", json!(1)).await?;
    expiring.expect_msg("exp.t", &json!(1)).await?;
    lasting.expect_msg("exp.t", &json!(1)).await?;
    // Then closed with 1008 (exp is in whole seconds: within about 3 s).
    expiring
        .expect_close(1008, Duration::from_secs(5))
        .await
        .with_context(|| format!("after {:?}", started.elapsed()))?;
    let elapsed = started.elapsed();
    ensure!(
        elapsed >= Duration::from_millis(900),
        "closed after {elapsed:?}, before the token's exp"
    );
    ensure!(
        now_secs() >= exp,
        "closed before exp ({exp}); now {}",
        now_secs()
    );
    // Only that session.
    lasting.assert_alive().await?;
    lasting.publish("exp.t", json!(2)).await?;
    lasting.expect_msg("exp.t", &json!(2)).await?;
    // Counted once the node is done with it (dropping our end ends its
    // wait for our side of the close).
    drop(expiring);
    node.wait_metric_labeled(
        "herald_disconnects_total",
        ("code", "1008"),
        Duration::from_secs(3),
        |v| v == 1.0,
    )
    .await?;
    // Once past exp, the token no longer opens a session.
    while now_secs() <= exp {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = upgrade_status(node.ws_connect().bearer(&short)).await?;
    ensure!(status == 401, "expired token at the upgrade: HTTP {status}");
    lasting.close().await
}

/// Sleeps until the wall clock is `frac` of the way into a second.
async fn align_to_second_fraction(frac: f64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    let into = now.subsec_nanos() as f64 / 1e9;
    let wait = if into <= frac {
        frac - into
    } else {
        1.0 - into + frac
    };
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
}

#[tokio::test]
async fn session_is_closed_at_exp_not_later() -> Result<()> {
    let node = auth_node().await?;
    // Connect late in a second, so that truncating "now" to whole seconds
    // would put the close ~0.85 s after exp.
    align_to_second_fraction(0.85).await;
    let exp = now_secs() + 2;
    let tok = token(
        SECRET,
        &json!({"exp": exp, "publish": ["exp.>"], "subscribe": ["exp.>"]}),
    );
    let mut ws = node.ws_connect().bearer(&tok).connect().await?;
    ws.assert_alive().await?;
    let exp_at = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(exp)?);
    let (ended, _) = ws.wait_end(Duration::from_secs(5)).await?;
    let closed_at = std::time::SystemTime::now();
    ensure!(
        ended == cluster_tests::Ended::Close(1008, String::new()),
        "expected close 1008, got {ended:?}"
    );
    let late = closed_at.duration_since(exp_at).unwrap_or_default();
    ensure!(
        late <= Duration::from_millis(300),
        "the session was closed {late:?} after its token's exp"
    );
    Ok(())
}

// ---- RS256 ----

/// A fresh directory for key files.
fn key_dir(label: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "herald-auth-{}-{}-{label}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Writes `private.pem` and `public.pem` (a 2048-bit RSA pair) into `dir`.
fn rsa_pair(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .context("run openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let private_s = private.to_str().context("utf-8 path")?;
    let public_s = public.to_str().context("utf-8 path")?;
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        private_s,
    ])?;
    run(&["pkey", "-in", private_s, "-pubout", "-out", public_s])?;
    Ok((private, public))
}

fn rs256_token(private_pem: &[u8], claims: &Value) -> Result<String> {
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(private_pem)?,
    )?)
}

#[tokio::test]
async fn rs256_public_key_verifies_tokens() -> Result<()> {
    if !openssl_available() {
        eprintln!("note: openssl is not installed; skipping the RS256 test");
        return Ok(());
    }
    let dir = key_dir("rs256")?;
    let (private, public) = rsa_pair(&dir)?;
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir)?;
    let (other_private, _) = rsa_pair(&other_dir)?;
    let public_s = public.to_str().context("utf-8 path")?;
    let node = Node::start(&["--auth-rs256-public-key", public_s]).await?;

    let claims = json!({"exp": now_secs() + 3600, "publish": ["rs.>"], "subscribe": ["rs.*"]});
    let good = rs256_token(&std::fs::read(&private)?, &claims)?;
    let mut ws = node.ws_connect().bearer(&good).connect().await?;
    let mut by_query = node.ws_connect().token_query(&good).connect().await?;
    round_trip(&mut ws, &mut by_query, "rs.a").await?;
    ws.send_json(json!({"op": "sub", "id": 5, "topic": "rs.>"}))
        .await?;
    ws.expect_err(Some(5), "forbidden").await?;
    let resp = node
        .http_publish(
            "rs.b",
            Some("application/json"),
            b"3",
            &[("Authorization", &format!("Bearer {good}"))],
        )
        .await?;
    ensure!(
        resp.status == 200,
        "RS256 HTTP publish: {} {}",
        resp.status,
        resp.text()
    );

    // Refused: another key, HS256 (also with the public key as the HMAC
    // secret: no algorithm confusion), no token.
    let wrong_key = rs256_token(&std::fs::read(&other_private)?, &claims)?;
    let hs = token(SECRET, &claims);
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&std::fs::read(&public)?),
    )?;
    for (what, bad) in [
        ("another key", &wrong_key),
        ("HS256", &hs),
        ("HS256 keyed with the public key", &confused),
    ] {
        let status = upgrade_status(node.ws_connect().bearer(bad)).await?;
        ensure!(status == 401, "{what}: HTTP {status}");
        let resp = node
            .http_publish(
                "rs.b",
                Some("application/json"),
                b"3",
                &[("Authorization", &format!("Bearer {bad}"))],
            )
            .await?;
        check_error_body(&resp, 401, "unauthorized").with_context(|| what.to_owned())?;
    }
    let status = upgrade_status(node.ws_connect()).await?;
    ensure!(status == 401, "no token: HTTP {status}");
    ws.close().await?;
    by_query.close().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn both_hs256_and_rs256_configured_refuses_to_start() -> Result<()> {
    // The public key file need not exist: the conflict is found first.
    let result = Node::start(&[
        "--auth-hs256-secret",
        SECRET,
        "--auth-rs256-public-key",
        "/nonexistent/key.pem",
    ])
    .await;
    match result {
        Ok(_) => bail!("a node with both auth keys started"),
        Err(e) => {
            let text = format!("{e:#}");
            ensure!(
                text.contains("auth"),
                "the refusal does not name auth: {text}"
            );
            Ok(())
        }
    }
}

#[tokio::test]
async fn unreadable_rs256_key_refuses_to_start() -> Result<()> {
    let dir = key_dir("badkey")?;
    let path = dir.join("not-a-key.pem");
    std::fs::write(
        &path,
        "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n",
    )?;
    let path_s = path.to_str().context("utf-8 path")?;
    for key in [path_s, "/nonexistent/key.pem"] {
        match Node::start(&["--auth-rs256-public-key", key]).await {
            Ok(_) => bail!("a node started with RS256 key {key}"),
            Err(e) => {
                let text = format!("{e:#}");
                ensure!(
                    text.contains("RS256"),
                    "the refusal does not say why: {text}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn token_is_refused_from_its_exp_on() -> Result<()> {
    let node = auth_node().await?;
    // Early in a second, with exp = this very second: the expiry time has
    // been reached (by ~100 ms) and the next ~900 ms are still "now == exp".
    align_to_second_fraction(0.1).await;
    let exp = now_secs();
    let tok = token(
        SECRET,
        &json!({"exp": exp, "publish": ["exp.>"], "subscribe": ["exp.>"]}),
    );
    let status = upgrade_status(node.ws_connect().bearer(&tok)).await?;
    let resp = node
        .http_publish(
            "exp.t",
            Some("application/json"),
            b"1",
            &[("Authorization", &format!("Bearer {tok}"))],
        )
        .await?;
    ensure!(now_secs() == exp, "too slow: the second of exp has passed");
    ensure!(
        status == 401,
        "upgrade with a token at its exp: HTTP {status}"
    );
    check_error_body(&resp, 401, "unauthorized").context("HTTP publish with a token at its exp")
}

#[tokio::test]
async fn without_a_key_auth_is_off_and_says_so() -> Result<()> {
    let node = Node::start(&[]).await?;
    ensure!(
        node.log().contains("auth is off"),
        "no warning that auth is off:\n{}",
        node.log()
    );
    // Tokens, good or bad, are ignored; everything is allowed.
    let mut plain = node.ws().await?;
    let mut with_garbage = node.ws_connect().bearer("garbage").connect().await?;
    round_trip(&mut plain, &mut with_garbage, "any.topic").await?;
    let resp = node
        .http_publish("any.topic", Some("application/json"), b"1", &[])
        .await?;
    ensure!(
        resp.status == 200,
        "HTTP publish without auth: {}",
        resp.status
    );
    plain.expect_msg("any.topic", &json!(1)).await?;
    plain.close().await?;
    with_garbage.close().await
}
