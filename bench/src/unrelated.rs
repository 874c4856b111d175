//! Background load for the fan-out run: wildcard subscriptions that match
//! none of the published messages.
//!
//! A broker that tries every wildcard pattern for each message slows down
//! with every such subscription anywhere; one that indexes them does not.
//! `herald-bench fanout --unrelated-wildcards N` holds N of them
//! (`unrelated.<run>.<i>.*`) on extra connections while it publishes, so
//! the two cases can be compared with the same command.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::nats::{self, NatsEvent, NatsParser};
use crate::session::Target;
use crate::ws::{BufferProfile, Incoming, SubscriberWs};

/// Subscriptions per connection: under Herald's default 1,024 per session.
const PER_CONNECTION: usize = 1000;
/// How long one connection's subscriptions may take to be confirmed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections holding the subscriptions, each read by a task of its own
/// (which answers the broker's pings, so a long run keeps them); they end
/// when this is dropped.
pub struct Held {
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Held {
    pub fn subscriptions(&self) -> usize {
        self.readers.len() * PER_CONNECTION
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// Opens connections (round robin over `urls`) holding `count` wildcard
/// subscriptions (rounded up to whole connections), each confirmed.
pub async fn hold(target: Target, urls: &[String], count: usize) -> Result<Held> {
    let run = crate::clock::now_ns() % 1_000_000_000;
    let mut readers = Vec::new();
    for c in 0..count.div_ceil(PER_CONNECTION) {
        let url = crate::ws::url_for(urls, c);
        let first = c * PER_CONNECTION;
        let patterns = (first..first + PER_CONNECTION).map(|i| format!("unrelated.{run}.{i}.*"));
        let ws = match target {
            Target::Herald => herald_connection(url, patterns).await,
            Target::Nats => nats_connection(url, patterns).await,
        }
        .with_context(|| format!("unrelated wildcard connection {c} on {url}"))?;
        readers.push(tokio::spawn(read_until_closed(ws, target)));
    }
    Ok(Held { readers })
}

/// Nothing published matches these subscriptions; reading only answers
/// pings, WebSocket ones and NATS's `PING` (and notices an early close).
async fn read_until_closed(mut ws: SubscriberWs, target: Target) {
    loop {
        match ws.next().await {
            Ok(Incoming::Data(data)) => {
                let nats_ping =
                    target == Target::Nats && memchr::memmem::find(&data, nats::PING).is_some();
                if nats_ping && ws.send(nats::PONG, true).await.is_err() {
                    return;
                }
            }
            Ok(Incoming::Closed(code)) => {
                eprintln!("an unrelated-wildcard connection was closed (code {code:?})");
                return;
            }
            Err(e) => {
                eprintln!("an unrelated-wildcard connection failed: {e:#}");
                return;
            }
        }
    }
}

async fn herald_connection(
    url: &str,
    patterns: impl Iterator<Item = String>,
) -> Result<SubscriberWs> {
    let mut ws = SubscriberWs::connect(url, Some("herald.v1.json"), BufferProfile::Idle).await?;
    let subs: Vec<serde_json::Value> = patterns
        .enumerate()
        .map(|(id, topic)| serde_json::json!({"op": "sub", "id": id, "topic": topic}))
        .collect();
    let expected = subs.len();
    ws.send(serde_json::to_string(&subs)?.as_bytes(), false)
        .await?;
    let confirm = async {
        let mut confirmed = 0;
        while confirmed < expected {
            let frame = match ws.next().await? {
                Incoming::Data(frame) => frame,
                Incoming::Closed(code) => bail!("closed while subscribing (code {code:?})"),
            };
            let replies = match serde_json::from_slice(&frame)? {
                serde_json::Value::Array(replies) => replies,
                reply => vec![reply],
            };
            for reply in replies {
                match reply["op"].as_str() {
                    Some("ok") => confirmed += 1,
                    Some("err") => bail!("sub refused: {reply}"),
                    _ => {}
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .context("timed out waiting for the subscriptions' ok")??;
    Ok(ws)
}

async fn nats_connection(
    url: &str,
    patterns: impl Iterator<Item = String>,
) -> Result<SubscriberWs> {
    let mut ws = SubscriberWs::connect(url, None, BufferProfile::Idle).await?;
    let mut hello = nats::CONNECT.to_vec();
    for (sid, subject) in patterns.enumerate() {
        hello.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
    }
    hello.extend_from_slice(nats::PING);
    ws.send(&hello, true).await?;
    let confirm = async {
        let mut parser = NatsParser::default();
        loop {
            match ws.next().await? {
                Incoming::Data(bytes) => parser.feed(&bytes),
                Incoming::Closed(code) => bail!("closed while subscribing (code {code:?})"),
            }
            while let Some(event) = parser.next_event()? {
                match event {
                    NatsEvent::Pong => return Ok(()),
                    NatsEvent::Err(e) => bail!("SUB refused: {e}"),
                    _ => {}
                }
            }
        }
    };
    tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .context("timed out waiting for PONG after the SUBs")??;
    Ok(ws)
}
