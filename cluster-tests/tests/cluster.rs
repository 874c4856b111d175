//! Clusters of real nodes over QUIC with mutual TLS: delivery between every
//! pair of nodes, per-topic order with publishers on several nodes,
//! wildcards and queue groups across nodes, a node joining, a node killed
//! (-9), restarted with the same id, frozen (an owner outage), and nodes
//! that must stay out (another CA, another cluster name, no TLS at all).
//! Each node's per-peer link metrics (`herald_peer_*{peer}` on `/metrics`)
//! are checked against the traffic and a kill -9 and restart.
//!
//! Tests cannot ask which node owns a topic, so they use many topics (the
//! ring is deterministic: the same names always land on the same nodes),
//! and where it matters they check that every node owns some (each node's
//! `herald_topics` gauge counts the topics it owns). Every wait is bounded.
//!
//! A regression covered here: when a member dies, a survivor whose ring
//! changes first tells the new owner of each moved topic about its exact
//! subscribers (`Interest`) before that owner's own ring has changed; the
//! owner must keep that interest.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cluster_tests::node::{member_generation, member_state, ring_owners, CONVERGE_TIMEOUT};
use cluster_tests::{
    check_err, seq_epoch, Ca, Cluster, Metrics, Node, NodeBuilder, PeerMetrics, WsClient, QUIET,
};
use serde_json::{json, Value};

/// How long a killed node may take to stop mattering: every topic accepts
/// publishes again from the survivors, and their rings no longer hold it.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);
/// How long the messages a test waits for may take to arrive.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// `n` topics `0.SUFFIX`, `1.SUFFIX`, ...: the number comes first because
/// the ring hashes topics with FNV, which spreads names that differ only in
/// their last bytes badly (`pair.0`..`pair.29` land on two of three nodes,
/// none on the third).
fn topics(suffix: &str, n: usize) -> Vec<String> {
    (0..n).map(|k| format!("{k}.{suffix}")).collect()
}

/// The data of a test message: who sent it, where, and its number; unique
/// within a test.
fn data(tag: &str, topic: &str, i: usize) -> String {
    format!("{tag}|{topic}|{i}")
}

/// A subscribing session and every `msg` it received, in order.
struct Subscriber {
    name: String,
    ws: WsClient,
    got: Vec<Value>,
    /// The `seq` in the `ok` of each exact subscription.
    start: BTreeMap<String, u64>,
}

impl Subscriber {
    async fn connect(node: &Node, name: &str) -> Result<Subscriber> {
        Ok(Subscriber {
            name: format!("{name}@{}", node.id()),
            ws: node.ws().await?,
            got: Vec::new(),
            start: BTreeMap::new(),
        })
    }

    /// Exact subscriptions to every topic; records each `ok.seq`.
    async fn sub_all(&mut self, topics: &[String]) -> Result<()> {
        for topic in topics {
            let ok = self
                .ws
                .sub(topic)
                .await
                .with_context(|| format!("{}: sub {topic}", self.name))?;
            let seq = ok["seq"]
                .as_u64()
                .with_context(|| format!("{}: ok to an exact sub without seq: {ok}", self.name))?;
            self.start.insert(topic.clone(), seq);
        }
        Ok(())
    }

    async fn sub_group_all(&mut self, topics: &[String], group: &str) -> Result<()> {
        for topic in topics {
            self.ws
                .sub_group(topic, group)
                .await
                .with_context(|| format!("{}: sub {topic} group {group}", self.name))?;
        }
        Ok(())
    }

    /// Receives one more server message, which must be a `msg`.
    async fn recv_msg(&mut self, timeout: Duration) -> Result<()> {
        let v = self.ws.recv_timeout(timeout).await?;
        ensure!(
            v["op"] == "msg",
            "{}: expected only msgs, got {v}",
            self.name
        );
        self.got.push(v);
        Ok(())
    }

    /// The data strings received so far.
    fn data_seen(&self) -> BTreeSet<String> {
        self.got
            .iter()
            .filter_map(|m| m["data"].as_str().map(str::to_owned))
            .collect()
    }

    /// Receives until every item of `want` (data strings) has arrived.
    async fn wait_for(&mut self, want: &BTreeSet<String>, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut seen = self.data_seen();
        while !want.is_subset(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = self.recv_msg(left).await {
                let missing: Vec<&String> = want.difference(&seen).take(10).collect();
                bail!(
                    "{}: {} of {} expected messages missing after {timeout:?} ({e:#}); e.g. {missing:?}",
                    self.name,
                    want.difference(&seen).count(),
                    want.len()
                );
            }
            if let Some(d) = self.got.last().and_then(|m| m["data"].as_str()) {
                seen.insert(d.to_owned());
            }
        }
        Ok(())
    }

    /// Nothing more arrives for [`QUIET`].
    async fn quiet(&mut self) -> Result<()> {
        self.ws
            .expect_nothing(QUIET)
            .await
            .with_context(|| format!("{}: after {} messages", self.name, self.got.len()))
    }

    /// `(seq, data)` per topic, in arrival order.
    fn per_topic(&self) -> BTreeMap<String, Vec<(u64, String)>> {
        let mut out: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        for m in &self.got {
            let topic = m["topic"].as_str().unwrap_or_default().to_owned();
            let seq = m["seq"].as_u64().unwrap_or(u64::MAX);
            let data = m["data"].as_str().unwrap_or_default().to_owned();
            out.entry(topic).or_default().push((seq, data));
        }
        out
    }

    /// No data twice; per topic `seq` rises by exactly 1 from the `ok`'s
    /// (or from wherever the topic was, for a wildcard), except that with
    /// `moves` the topic may start over lower (a new epoch at a new owner:
    /// seq 1, or a little more when the first messages of the new epoch
    /// were sequenced before this node had told the new owner of its
    /// interest). Returns the restarts that did not start at 1.
    fn check_order(&self, moves: bool) -> Result<Vec<String>> {
        let mut seen = BTreeSet::new();
        for m in &self.got {
            let d = m["data"].as_str().unwrap_or_default();
            ensure!(
                seen.insert(d.to_owned()),
                "{}: {d} received twice",
                self.name
            );
        }
        let mut late_restarts = Vec::new();
        for (topic, list) in self.per_topic() {
            let mut last = self.start.get(&topic).copied().unwrap_or(0);
            let wildcard_start = !self.start.contains_key(&topic);
            for (i, (seq, d)) in list.iter().enumerate() {
                let restart = moves && *seq <= last;
                let next = *seq == last + 1
                    || restart
                    // A wildcard subscription starts wherever the topic is.
                    || (wildcard_start && i == 0);
                ensure!(
                    next,
                    "{}: on {topic}, seq {seq} ({d}) after {last}; the topic's seqs: {:?}",
                    self.name,
                    list.iter().map(|(s, _)| *s).collect::<Vec<_>>()
                );
                if restart && *seq != 1 {
                    late_restarts.push(format!(
                        "{}: {topic} restarted at seq {seq} ({d}) after {last}; seqs {:?}",
                        self.name,
                        list.iter().map(|(s, _)| *s).collect::<Vec<_>>()
                    ));
                }
                last = *seq;
            }
        }
        Ok(late_restarts)
    }

    /// The `seq` with which `data` arrived.
    /// Fails unless `data` arrived with the seq its publisher was acked.
    fn check_acked_seq(&self, data: &str, seq: u64) -> Result<()> {
        ensure!(
            self.seq_of(data) == Some(seq),
            "{}: {data} acked with seq {seq}, received with {:?}",
            self.name,
            self.seq_of(data)
        );
        Ok(())
    }

    fn seq_of(&self, data: &str) -> Option<u64> {
        self.got
            .iter()
            .find(|m| m["data"] == data)
            .and_then(|m| m["seq"].as_u64())
    }
}

/// What a `pub` with an id came back with.
#[derive(Debug, Clone)]
enum PubReply {
    /// `seq` and `epoch`.
    Ok(u64, String),
    Unavailable,
}

/// Sends every `(topic, data)` as a `pub` with an id (pipelined), then
/// collects one reply per publish (`ok`, or `err unavailable`; anything else
/// is an error), each within `timeout` of the last send. Replies are
/// returned in the order of `items`.
async fn publish_all(
    ws: &mut WsClient,
    items: &[(String, String)],
    timeout: Duration,
) -> Result<Vec<PubReply>> {
    let mut ids = BTreeMap::new();
    for (k, (topic, d)) in items.iter().enumerate() {
        let id = ws.fresh_id();
        ids.insert(id, k);
        ws.feed_json(json!({"op": "pub", "id": id, "topic": topic, "data": d}))
            .await?;
    }
    ws.flush().await?;
    let deadline = Instant::now() + timeout;
    let mut replies: Vec<Option<PubReply>> = vec![None; items.len()];
    let mut left = items.len();
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        let v = ws.recv_timeout(wait).await.with_context(|| {
            format!(
                "{left} of {} publishes unanswered after {timeout:?}",
                items.len()
            )
        })?;
        let id = v["id"].as_u64().unwrap_or(u64::MAX);
        let Some(&k) = ids.get(&id) else {
            bail!("reply to no publish of ours: {v}");
        };
        ensure!(replies[k].is_none(), "second reply for {:?}: {v}", items[k]);
        replies[k] = Some(match v["op"].as_str() {
            Some("ok") => {
                let (seq, epoch) = seq_epoch(&v)?;
                PubReply::Ok(seq, epoch)
            }
            _ => {
                check_err(&v, Some(id), "unavailable")
                    .with_context(|| format!("publish {:?}", items[k]))?;
                PubReply::Unavailable
            }
        });
        left -= 1;
    }
    Ok(replies.into_iter().flatten().collect())
}

/// Like [`publish_all`], but every publish must be acked: returns the seqs.
async fn publish_acked(ws: &mut WsClient, items: &[(String, String)]) -> Result<Vec<u64>> {
    Ok(publish_acked_epochs(ws, items)
        .await?
        .into_iter()
        .map(|(seq, _)| seq)
        .collect())
}

/// Like [`publish_acked`], with each ack's epoch.
async fn publish_acked_epochs(
    ws: &mut WsClient,
    items: &[(String, String)],
) -> Result<Vec<(u64, String)>> {
    let replies = publish_all(ws, items, DELIVERY_TIMEOUT).await?;
    items
        .iter()
        .zip(replies)
        .map(|(item, reply)| match reply {
            PubReply::Ok(seq, epoch) => Ok((seq, epoch)),
            PubReply::Unavailable => bail!("publish {item:?} answered unavailable"),
        })
        .collect()
}

/// `herald_topics` of every live node: the topics each one owns.
async fn owned_topics(cluster: &Cluster) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for node in cluster.live() {
        out.insert(
            node.id().to_owned(),
            node.metrics().await?.sum("herald_topics"),
        );
    }
    Ok(out)
}

/// Every live node owns at least one topic (the test's topics are spread
/// over every owner).
async fn every_node_owns_topics(cluster: &Cluster) -> Result<()> {
    let owned = owned_topics(cluster).await?;
    ensure!(
        owned.values().all(|n| *n >= 1.0),
        "some node owns none of the test's topics: {owned:?}"
    );
    Ok(())
}

#[tokio::test]
async fn every_pair_of_nodes_delivers_both_ways_in_order() -> Result<()> {
    let cluster = Cluster::start(3, |b| b).await?;
    let topics = topics("pair", 30);
    let mut subs = Vec::new();
    for node in &cluster.nodes {
        let mut sub = Subscriber::connect(node, "sub").await?;
        sub.sub_all(&topics).await?;
        for (topic, seq) in &sub.start {
            ensure!(*seq == 0, "{topic} is new, yet its ok has seq {seq}");
        }
        subs.push(sub);
    }
    // Each node in turn publishes twice to every topic: every subscriber
    // (on every node) gets every publisher's (on every node) messages, for
    // topics of every owner.
    let mut want = BTreeSet::new();
    let mut acked = BTreeMap::new();
    for node in &cluster.nodes {
        let mut publisher = node.ws().await?;
        let items: Vec<(String, String)> = (0..2)
            .flat_map(|i| {
                topics
                    .iter()
                    .map(move |t| (t.clone(), data(node.id(), t, i)))
            })
            .collect();
        let seqs = publish_acked(&mut publisher, &items).await?;
        for ((_, d), seq) in items.into_iter().zip(seqs) {
            want.insert(d.clone());
            acked.insert(d, seq);
        }
    }
    every_node_owns_topics(&cluster).await?;
    for sub in &mut subs {
        sub.wait_for(&want, DELIVERY_TIMEOUT).await?;
        sub.quiet().await?;
        sub.check_order(false)?;
        ensure!(sub.got.len() == want.len(), "{}: extra messages", sub.name);
        for (d, seq) in &acked {
            sub.check_acked_seq(d, *seq)?;
        }
        // Per topic: n1's two, n2's two, n3's two, in that order.
        for (topic, list) in sub.per_topic() {
            let order: Vec<&str> = list.iter().map(|(_, d)| d.as_str()).collect();
            let expected: Vec<String> = cluster
                .nodes
                .iter()
                .flat_map(|n| (0..2).map(|i| data(n.id(), &topic, i)))
                .collect();
            ensure!(order == expected, "{}: {topic}: {order:?}", sub.name);
        }
    }
    Ok(())
}

#[tokio::test]
async fn publishers_on_three_nodes_give_one_order_per_topic() -> Result<()> {
    const N: usize = 40;
    let cluster = Cluster::start(3, |b| b).await?;
    let topics = topics("order", 6);
    let mut subs = Vec::new();
    for node in &cluster.nodes {
        let mut sub = Subscriber::connect(node, "sub").await?;
        sub.sub_all(&topics).await?;
        subs.push(sub);
    }
    let mut publishers = Vec::new();
    for node in &cluster.nodes {
        publishers.push((node.id().to_owned(), node.ws().await?));
    }
    // Three publishers at once, each sending N to every topic, pipelined.
    let runs = publishers.iter_mut().map(|(id, ws)| {
        let id: &str = id;
        let items: Vec<(String, String)> = (0..N)
            .flat_map(|i| topics.iter().map(move |t| (t.clone(), data(id, t, i))))
            .collect();
        async move {
            let seqs = publish_acked(ws, &items).await?;
            Ok::<_, anyhow::Error>(items.into_iter().zip(seqs).collect::<Vec<_>>())
        }
    });
    let results = futures_util::future::join_all(runs).await;
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut want = BTreeSet::new();
    for result in results {
        for ((_, d), seq) in result? {
            want.insert(d.clone());
            acked.insert(d, seq);
        }
    }
    for sub in &mut subs {
        sub.wait_for(&want, DELIVERY_TIMEOUT).await?;
        sub.quiet().await?;
        sub.check_order(false)?;
    }
    let reference = subs[0].per_topic();
    for (topic, list) in &reference {
        ensure!(list.len() == 3 * N, "{topic}: {} messages", list.len());
        let seqs: Vec<u64> = list.iter().map(|(s, _)| *s).collect();
        ensure!(
            seqs == (1..=3 * N as u64).collect::<Vec<_>>(),
            "{topic}: seqs {seqs:?}"
        );
        for (seq, d) in list {
            ensure!(
                acked.get(d) == Some(seq),
                "{topic}: {d} seen with seq {seq}, acked with {:?}",
                acked.get(d)
            );
        }
        // Each publisher's own messages in the order it sent them.
        for (id, _) in &publishers {
            let own: Vec<&str> = list
                .iter()
                .map(|(_, d)| d.as_str())
                .filter(|d| d.starts_with(&format!("{id}|")))
                .collect();
            let sent: Vec<String> = (0..N).map(|i| data(id, topic, i)).collect();
            ensure!(
                own == sent,
                "{topic}: {id}'s messages out of order: {own:?}"
            );
        }
    }
    for sub in &subs[1..] {
        ensure!(
            sub.per_topic() == reference,
            "{} saw another order than {}",
            sub.name,
            subs[0].name
        );
    }
    Ok(())
}

#[tokio::test]
async fn wildcards_reach_across_nodes() -> Result<()> {
    let cluster = Cluster::start(3, |b| b).await?;
    let (n1, n2, n3) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    // On n1: `wc.>` and `wc.*.y` on one session (each message once), and
    // `wc.*.y` alone; on n3, `wc.*`.
    let mut both = Subscriber::connect(n1, "both").await?;
    both.ws.sub("wc.>").await?;
    both.ws.sub("wc.*.y").await?;
    let mut deep = Subscriber::connect(n1, "deep").await?;
    deep.ws.sub("wc.*.y").await?;
    let mut shallow = Subscriber::connect(n3, "shallow").await?;
    shallow.ws.sub("wc.*").await?;
    let deep_topics: Vec<String> = (0..15).map(|k| format!("wc.x{k}.y")).collect();
    let shallow_topics: Vec<String> = (0..15)
        .map(|k| format!("wc.{k}-shallow-topic-name"))
        .collect();
    let mut want_deep = BTreeSet::new();
    let mut want_shallow = BTreeSet::new();
    for node in [n2, n3] {
        let mut publisher = node.ws().await?;
        let mut items = Vec::new();
        for (topics, want) in [
            (&deep_topics, &mut want_deep),
            (&shallow_topics, &mut want_shallow),
        ] {
            for t in topics {
                let d = data(node.id(), t, 0);
                want.insert(d.clone());
                items.push((t.clone(), d));
            }
        }
        publish_acked(&mut publisher, &items).await?;
    }
    every_node_owns_topics(&cluster).await?;
    let all: BTreeSet<String> = want_deep.union(&want_shallow).cloned().collect();
    both.wait_for(&all, DELIVERY_TIMEOUT).await?;
    deep.wait_for(&want_deep, DELIVERY_TIMEOUT).await?;
    shallow.wait_for(&want_shallow, DELIVERY_TIMEOUT).await?;
    for (sub, want) in [
        (&mut both, &all),
        (&mut deep, &want_deep),
        (&mut shallow, &want_shallow),
    ] {
        sub.quiet().await?;
        sub.check_order(false)?;
        ensure!(
            sub.data_seen() == *want && sub.got.len() == want.len(),
            "{}: got {:?}",
            sub.name,
            sub.data_seen()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_queue_group_gets_each_message_once_across_nodes() -> Result<()> {
    let cluster = Cluster::start(3, |b| b).await?;
    let topics = topics("jobs", 8);
    let mut members = Vec::new();
    // Members on every node, two on n1.
    for (k, node) in cluster.nodes.iter().chain([&cluster.nodes[0]]).enumerate() {
        let mut member = Subscriber::connect(node, &format!("worker{k}")).await?;
        member.sub_group_all(&topics, "workers").await?;
        members.push(member);
    }
    let mut plain = Subscriber::connect(&cluster.nodes[1], "plain").await?;
    plain.sub_all(&topics).await?;
    let mut want = BTreeSet::new();
    for node in &cluster.nodes {
        let mut publisher = node.ws().await?;
        let items: Vec<(String, String)> = (0..10)
            .flat_map(|i| {
                topics
                    .iter()
                    .map(move |t| (t.clone(), data(node.id(), t, i)))
            })
            .collect();
        publish_acked(&mut publisher, &items).await?;
        want.extend(items.into_iter().map(|(_, d)| d));
    }
    plain.wait_for(&want, DELIVERY_TIMEOUT).await?;
    plain.quiet().await?;
    plain.check_order(false)?;
    ensure!(plain.got.len() == want.len(), "plain: extra messages");
    // Members together get every message once: read until all arrived,
    // then make sure nothing more comes.
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let total: usize = members.iter().map(|m| m.got.len()).sum();
        if total >= want.len() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "group members got {total} of {} messages",
            want.len()
        );
        for member in &mut members {
            let _ = member.recv_msg(Duration::from_millis(20)).await;
        }
    }
    let mut counts = BTreeMap::new();
    let mut union: Vec<String> = Vec::new();
    for member in &mut members {
        member.quiet().await?;
        counts.insert(member.name.clone(), member.got.len());
        union.extend(member.data_seen());
        ensure!(
            member.data_seen().len() == member.got.len(),
            "{} got a message twice",
            member.name
        );
    }
    let distinct: BTreeSet<String> = union.iter().cloned().collect();
    ensure!(
        union.len() == want.len() && distinct == want,
        "group deliveries: {} in all, {} distinct, {} published; per member {counts:?}",
        union.len(),
        distinct.len(),
        want.len()
    );
    Ok(())
}

#[tokio::test]
async fn a_fourth_node_joins_while_delivery_goes_on() -> Result<()> {
    let mut cluster = Cluster::start(3, |b| b).await?;
    let topics = topics("mv", 40);
    let mut subs = Vec::new();
    for node in &cluster.nodes {
        let mut sub = Subscriber::connect(node, "sub").await?;
        sub.sub_all(&topics).await?;
        subs.push(sub);
    }
    let mut publishers = Vec::new();
    for node in &cluster.nodes {
        publishers.push((node.id().to_owned(), node.ws().await?));
    }
    // Before: everything arrives.
    let mut before = BTreeSet::new();
    for (id, ws) in &mut publishers {
        let items: Vec<(String, String)> =
            topics.iter().map(|t| (t.clone(), data(id, t, 0))).collect();
        publish_acked(ws, &items).await?;
        before.extend(items.into_iter().map(|(_, d)| d));
    }
    for sub in &mut subs {
        sub.wait_for(&before, DELIVERY_TIMEOUT).await?;
    }
    // During: publishers keep going (with acks, round robin over nodes and
    // topics) while n4 starts and the rings take it in.
    let mut during_acked = 0usize;
    let mut during_unavailable = 0usize;
    let joined = std::cell::Cell::new(false);
    let join = async {
        let result = async {
            let i = cluster.add_node(|b| b).await?;
            cluster.wait_converged(CONVERGE_TIMEOUT).await?;
            Ok::<usize, anyhow::Error>(i)
        }
        .await;
        joined.set(true);
        result
    };
    let load = async {
        let mut k = 1usize;
        // Each publish is answered before the next: none is left in flight
        // when the join is done.
        while !joined.get() {
            for (id, ws) in publishers.iter_mut() {
                let t = &topics[k % topics.len()];
                let item = (t.clone(), data(id, t, k));
                match publish_all(ws, std::slice::from_ref(&item), DELIVERY_TIMEOUT).await?[0] {
                    PubReply::Ok(..) => during_acked += 1,
                    PubReply::Unavailable => during_unavailable += 1,
                }
                k += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok::<(), anyhow::Error>(())
    };
    let (n4, load) = tokio::join!(join, load);
    let n4 = n4?;
    load?;
    eprintln!("during the join: {during_acked} publishes acked, {during_unavailable} unavailable");
    // After the join: n4 owns some topics, and every acked publish reaches
    // every subscriber, with the seq it was acked with.
    let mut after = BTreeMap::new();
    let n4_node = &cluster.nodes[n4];
    let mut late = Subscriber::connect(n4_node, "late").await?;
    late.sub_all(&topics).await?;
    let mut n4_publisher = n4_node.ws().await?;
    for (id, ws) in publishers
        .iter_mut()
        .map(|(id, ws)| (id.as_str(), ws))
        .chain([("n4", &mut n4_publisher)])
    {
        let items: Vec<(String, String)> = topics
            .iter()
            .map(|t| (t.clone(), data(&format!("after-{id}"), t, 0)))
            .collect();
        let seqs = publish_acked(ws, &items).await?;
        after.extend(items.into_iter().map(|(_, d)| d).zip(seqs));
    }
    let owned = owned_topics(&cluster).await?;
    ensure!(
        owned.get("n4").is_some_and(|n| *n >= 1.0),
        "no topic moved to n4: {owned:?}"
    );
    let want: BTreeSet<String> = after.keys().cloned().collect();
    for sub in subs.iter_mut().chain([&mut late]) {
        sub.wait_for(&want, DELIVERY_TIMEOUT)
            .await
            .context("a publish acked after the join was lost")?;
        sub.quiet().await?;
        // Moved topics start over (a new epoch): allowed.
        for note in sub.check_order(true)? {
            eprintln!("during the join, {note}");
        }
        for (d, seq) in &after {
            sub.check_acked_seq(d, *seq)?;
        }
    }
    Ok(())
}

/// Publishes (with an id) to each topic from `ws` until every topic has
/// acked once; `unavailable` is retried. Returns the acked seq per data.
async fn publish_until_acked(
    ws: &mut WsClient,
    tag: &str,
    topics: &[String],
    deadline: Instant,
) -> Result<BTreeMap<String, u64>> {
    let mut pending: Vec<String> = topics.to_vec();
    let mut acked = BTreeMap::new();
    let mut round = 0;
    while !pending.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "{tag}: {} topics still refuse publishes, e.g. {:?}",
            pending.len(),
            &pending[..pending.len().min(5)]
        );
        let items: Vec<(String, String)> = pending
            .iter()
            .map(|t| (t.clone(), data(tag, t, round)))
            .collect();
        let replies = publish_all(ws, &items, Duration::from_secs(6)).await?;
        let mut still = Vec::new();
        for ((topic, d), reply) in items.into_iter().zip(replies) {
            match reply {
                PubReply::Ok(seq, _) => {
                    acked.insert(d, seq);
                }
                PubReply::Unavailable => still.push(topic),
            }
        }
        pending = still;
        round += 1;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(acked)
}

/// What [`kill_scenario`] holds the survivors' subscribers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MovedTopics {
    /// Exact subscribers must get new messages on the topics whose owner
    /// survived; a wildcard subscriber must get them on every topic.
    WildcardOnly,
    /// Exact subscribers (and no wildcard anywhere) must get new messages on
    /// every topic, the dead node's included.
    Exact,
}

/// 3 nodes; exact subscribers on n1 and n2 to 30 topics; kill -9 n3. Within
/// [`FAILOVER_BOUND`] every topic takes publishes (with id) again from both
/// survivors and their rings drop n3, which they list as dead (or not at
/// all); then a round published on the new ring reaches the subscribers, in
/// the same sessions, with the acked seqs.
async fn kill_scenario(moved: MovedTopics) -> Result<()> {
    let mut cluster = Cluster::start(3, |b| b).await?;
    let topics = topics("kill", 30);
    let mut subs = Vec::new();
    for node in &cluster.nodes[..2] {
        let mut sub = Subscriber::connect(node, "sub").await?;
        sub.sub_all(&topics).await?;
        subs.push(sub);
    }
    // A wildcard subscriber on a node makes every owner send that node
    // every message it covers, which would hide a lost exact interest: only
    // where exact subscribers are not checked on moved topics.
    let mut wild = None;
    if moved == MovedTopics::WildcardOnly {
        let mut sub = Subscriber::connect(&cluster.nodes[1], "wild").await?;
        sub.ws.sub("*.kill").await?;
        wild = Some(sub);
    }
    let mut publishers = Vec::new();
    for node in &cluster.nodes[..2] {
        publishers.push((node.id().to_owned(), node.ws().await?));
    }
    let mut before = BTreeSet::new();
    let mut epoch_before = BTreeMap::new();
    for (id, ws) in &mut publishers {
        let items: Vec<(String, String)> = topics
            .iter()
            .map(|t| (t.clone(), data(&format!("before-{id}"), t, 0)))
            .collect();
        let acks = publish_acked_epochs(ws, &items).await?;
        for ((topic, d), (_, epoch)) in items.into_iter().zip(acks) {
            before.insert(d);
            epoch_before.insert(topic, epoch);
        }
    }
    every_node_owns_topics(&cluster).await?;
    for sub in subs.iter_mut().chain(wild.as_mut()) {
        sub.wait_for(&before, DELIVERY_TIMEOUT).await?;
    }

    cluster.kill9(2).await?;
    let killed = Instant::now();
    let deadline = killed + FAILOVER_BOUND;
    // Every topic takes publishes again from both survivors.
    let mut acked = BTreeMap::new();
    for (id, ws) in &mut publishers {
        acked.extend(publish_until_acked(ws, &format!("after-{id}"), &topics, deadline).await?);
    }
    eprintln!(
        "every topic acked from both survivors {:?} after kill -9",
        killed.elapsed()
    );
    // Their rings drop n3; it is dead or gone from their member lists.
    let left = deadline.saturating_duration_since(Instant::now());
    for node in &cluster.nodes[..2] {
        node.wait_cluster_view("n3 off the ring and dead or gone", left, |v| {
            !ring_owners(v).contains("n3") && member_state(v, "n3").is_none_or(|s| s == "dead")
        })
        .await?;
    }
    eprintln!(
        "n3 off the ring and dead on both survivors {:?} after kill -9",
        killed.elapsed()
    );
    // One more acked round, all on the new ring. A topic whose epoch
    // changed moved (n3 owned it).
    let mut last = BTreeMap::new();
    let mut moved_topics = BTreeSet::new();
    for (id, ws) in &mut publishers {
        let items: Vec<(String, String)> = topics
            .iter()
            .map(|t| (t.clone(), data(&format!("last-{id}"), t, 0)))
            .collect();
        let acks = publish_acked_epochs(ws, &items).await?;
        for ((topic, d), (seq, epoch)) in items.into_iter().zip(acks) {
            if epoch_before.get(&topic) != Some(&epoch) {
                moved_topics.insert(topic.clone());
            }
            last.insert(d, (topic, seq));
        }
    }
    ensure!(
        !moved_topics.is_empty(),
        "no topic changed its epoch: n3 owned none?"
    );
    let checked = |topic: &str| moved == MovedTopics::Exact || !moved_topics.contains(topic);
    for sub in subs.iter_mut() {
        let want: BTreeSet<String> = last
            .iter()
            .filter(|(_, (topic, _))| checked(topic))
            .map(|(d, _)| d.clone())
            .collect();
        sub.wait_for(&want, DELIVERY_TIMEOUT)
            .await
            .with_context(|| {
                format!("after kill -9 of n3 (its topics, now moved: {moved_topics:?})")
            })?;
    }
    let all: BTreeSet<String> = last.keys().cloned().collect();
    if let Some(wild) = wild.as_mut() {
        wild.wait_for(&all, DELIVERY_TIMEOUT).await?;
    }
    for sub in subs.iter_mut().chain(wild.as_mut()) {
        // Whatever else arrives must be in order (and once).
        sub.quiet().await?;
        for note in sub.check_order(true)? {
            eprintln!("after the kill, {note}");
        }
        for (d, (topic, seq)) in &last {
            if checked(topic) || sub.name.starts_with("wild") {
                sub.check_acked_seq(d, *seq)?;
            }
        }
    }
    if moved == MovedTopics::Exact {
        // Publishes acked once the topics had moved are delivered too.
        for sub in &subs {
            let got = sub.data_seen();
            let lost: Vec<&String> = acked.keys().filter(|d| !got.contains(*d)).collect();
            ensure!(
                lost.is_empty(),
                "{}: acked after the kill yet never delivered: {lost:?}",
                sub.name
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_killed_node_is_replaced_and_survivors_keep_delivering() -> Result<()> {
    kill_scenario(MovedTopics::WildcardOnly).await
}

/// The survivors' exact subscribers to the dead node's topics, once the
/// topics moved.
#[tokio::test]
async fn exact_subscribers_on_survivors_get_the_dead_nodes_topics() -> Result<()> {
    kill_scenario(MovedTopics::Exact).await
}

#[tokio::test]
async fn a_restarted_node_rejoins_with_a_new_generation() -> Result<()> {
    let mut cluster = Cluster::start(3, |b| b).await?;
    let topics = topics("again", 30);
    // Subscribers on n1 and n3 stay in their sessions throughout.
    let mut subs = Vec::new();
    for i in [0, 2] {
        let mut sub = Subscriber::connect(&cluster.nodes[i], "sub").await?;
        sub.sub_all(&topics).await?;
        subs.push(sub);
    }
    let mut publisher = cluster.nodes[0].ws().await?;
    let items: Vec<(String, String)> = topics
        .iter()
        .map(|t| (t.clone(), data("before", t, 0)))
        .collect();
    publish_acked(&mut publisher, &items).await?;
    every_node_owns_topics(&cluster).await?;
    let before: BTreeSet<String> = items.into_iter().map(|(_, d)| d).collect();
    for sub in &mut subs {
        sub.wait_for(&before, DELIVERY_TIMEOUT).await?;
    }
    let view = cluster.nodes[0].cluster_view().await?;
    let old_generation = member_generation(&view, "n2").context("n2 listed")?;
    // kill -9 and start again at once, same id and ports: the others may
    // not even have noticed it was gone.
    cluster.kill9(1).await?;
    cluster.restart(1).await?;
    cluster.wait_converged(CONVERGE_TIMEOUT).await?;
    for node in &cluster.nodes {
        let view = node
            .wait_cluster_view("n2 ready with a new generation", CONVERGE_TIMEOUT, |v| {
                member_generation(v, "n2").is_some_and(|g| g > old_generation)
                    && member_state(v, "n2").as_deref() == Some("ready")
            })
            .await?;
        ensure!(ring_owners(&view).len() == 3, "{}: ring {view}", node.id());
    }
    // Delivery through it: a subscriber on n2's new life too, publishers on
    // every node, topics of every owner (n2's own again).
    let mut sub = Subscriber::connect(&cluster.nodes[1], "sub").await?;
    sub.sub_all(&topics).await?;
    subs.push(sub);
    let mut want = BTreeMap::new();
    for node in &cluster.nodes {
        let mut publisher = node.ws().await?;
        let items: Vec<(String, String)> = topics
            .iter()
            .map(|t| (t.clone(), data(node.id(), t, 0)))
            .collect();
        let seqs = publish_acked(&mut publisher, &items).await?;
        want.extend(items.into_iter().map(|(_, d)| d).zip(seqs));
    }
    every_node_owns_topics(&cluster).await?;
    let keys: BTreeSet<String> = want.keys().cloned().collect();
    for sub in &mut subs {
        sub.wait_for(&keys, DELIVERY_TIMEOUT).await?;
        sub.quiet().await?;
        // n2's topics start over at its new life: a new epoch.
        for note in sub.check_order(true)? {
            eprintln!("across the restart, {note}");
        }
        for (d, seq) in &want {
            sub.check_acked_seq(d, *seq)?;
        }
    }
    Ok(())
}

/// Every live node's per-peer metrics: node id, then peer id.
type PeerView = BTreeMap<String, BTreeMap<String, PeerMetrics>>;

/// How long links may take to come up, and counters to settle.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);

async fn peer_view(cluster: &Cluster) -> Result<PeerView> {
    scraped_view(cluster, Metrics::peers).await
}

/// What `pick` takes from every live node's `/metrics`, by node id.
async fn scraped_view<T>(
    cluster: &Cluster,
    pick: impl Fn(&Metrics) -> T,
) -> Result<BTreeMap<String, T>> {
    let mut view = BTreeMap::new();
    for node in cluster.live() {
        view.insert(node.id().to_owned(), pick(&node.metrics().await?));
    }
    Ok(view)
}

/// Scrapes every live node until `check` accepts the per-peer view, for at
/// most `timeout`; the error carries `check`'s last complaint and the view.
async fn wait_peer_view(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    check: impl Fn(&PeerView) -> Result<()>,
) -> Result<PeerView> {
    wait_scraped(cluster, what, timeout, Metrics::peers, check).await
}

/// [`wait_peer_view`] for what `pick` takes from each scrape.
async fn wait_scraped<T: std::fmt::Debug>(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    pick: impl Fn(&Metrics) -> T,
    check: impl Fn(&BTreeMap<String, T>) -> Result<()>,
) -> Result<BTreeMap<String, T>> {
    let deadline = Instant::now() + timeout;
    loop {
        let view = scraped_view(cluster, &pick).await?;
        match check(&view) {
            Ok(()) => return Ok(view),
            Err(e) if Instant::now() > deadline => {
                bail!("{what}: not within {timeout:?}: {e:#}\nscraped: {view:#?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A node's cluster-wide gauges and counters: members by state, ring
/// changes, and the publish-to-deliver histogram's count.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ClusterMetrics {
    ready: f64,
    ring_changes: f64,
    delivered: f64,
}

fn cluster_metrics(m: &Metrics) -> ClusterMetrics {
    ClusterMetrics {
        ready: m.labeled("herald_cluster_members", "state", "ready"),
        ring_changes: m.sum("herald_ring_changes_total"),
        delivered: m.sum("herald_publish_to_deliver_seconds_count"),
    }
}

/// The counters of a view (the RTT moves by itself).
fn peer_counters(view: &PeerView) -> BTreeMap<(&str, &str), [f64; 5]> {
    view.iter()
        .flat_map(|(node, peers)| {
            peers.iter().map(move |(peer, m)| {
                let counters = [
                    m.sent_frames,
                    m.sent_bytes,
                    m.received_frames,
                    m.received_bytes,
                    m.reconnects,
                ];
                ((node.as_str(), peer.as_str()), counters)
            })
        })
        .collect()
}

/// A view once no frame is in flight: two scrapes [`QUIET`] apart count
/// the same (the cluster sends no frames of its own while idle).
async fn settled_peer_view(cluster: &Cluster) -> Result<PeerView> {
    let deadline = Instant::now() + LINK_TIMEOUT;
    let mut last = peer_view(cluster).await?;
    loop {
        tokio::time::sleep(QUIET).await;
        let view = peer_view(cluster).await?;
        if peer_counters(&view) == peer_counters(&last) {
            return Ok(view);
        }
        ensure!(
            Instant::now() < deadline,
            "per-peer counters still moving after {LINK_TIMEOUT:?}: {view:#?}"
        );
        last = view;
    }
}

/// Each node lists exactly the other nodes of `ids`, connected, with a
/// measured RTT (loopback: above 0, far below a second).
fn all_linked(ids: &BTreeSet<String>, view: &PeerView) -> Result<()> {
    for (node, peers) in view {
        let others: BTreeSet<&String> = ids.iter().filter(|id| *id != node).collect();
        let listed: BTreeSet<&String> = peers.keys().collect();
        ensure!(listed == others, "{node} lists peers {listed:?}");
        for (peer, m) in peers {
            ensure!(m.connected == 1.0, "{node}: {peer} not connected: {m:?}");
            ensure!(
                m.rtt_seconds.is_some_and(|rtt| rtt > 0.0 && rtt < 1.0),
                "{node}: {peer} RTT {:?}",
                m.rtt_seconds
            );
        }
    }
    Ok(())
}

/// From `before` to `now`, every link carried frames both ways; what one
/// end counts as sent the other counts as received (frames and bytes,
/// each frame at least one byte plus its 4-byte length); no link
/// reconnected.
fn traffic_counted(before: &PeerView, now: &PeerView) -> Result<()> {
    let delta = |node: &str, peer: &str| -> Result<(PeerMetrics, PeerMetrics)> {
        let was = before
            .get(node)
            .and_then(|p| p.get(peer))
            .with_context(|| format!("{node} did not list {peer} before"))?;
        let is = now
            .get(node)
            .and_then(|p| p.get(peer))
            .with_context(|| format!("{node} does not list {peer}"))?;
        Ok((*was, *is))
    };
    for (node, peers) in now {
        for peer in peers.keys() {
            let (was, is) = delta(node, peer)?;
            let (their_was, their_is) = delta(peer, node)?;
            let sent = (
                is.sent_frames - was.sent_frames,
                is.sent_bytes - was.sent_bytes,
            );
            let got = (
                their_is.received_frames - their_was.received_frames,
                their_is.received_bytes - their_was.received_bytes,
            );
            ensure!(
                sent.0 > 0.0 && is.received_frames > was.received_frames,
                "{node} ↔ {peer}: no frames counted both ways: {was:?} then {is:?}"
            );
            ensure!(
                sent.1 >= 5.0 * sent.0,
                "{node} → {peer}: {} bytes for {} frames",
                sent.1,
                sent.0
            );
            ensure!(
                sent == got,
                "{node} sent {peer} {sent:?} (frames, bytes), {peer} received {got:?}"
            );
            ensure!(
                is.reconnects == was.reconnects,
                "{node} → {peer} reconnected: {was:?} then {is:?}"
            );
        }
    }
    Ok(())
}

/// Subscribers on every live node to topics of every owner, a publish to
/// each topic from every live node, all delivered everywhere: Publish and
/// Published frames from each node to each owner and back, Deliver frames
/// from each owner to each other node.
async fn cross_traffic(cluster: &Cluster, round: &str) -> Result<()> {
    let topics = topics(&format!("links-{round}"), 30);
    let mut subs = Vec::new();
    for node in cluster.live() {
        let mut sub = Subscriber::connect(node, round).await?;
        sub.sub_all(&topics).await?;
        subs.push(sub);
    }
    let mut want = BTreeSet::new();
    for node in cluster.live() {
        let mut publisher = node.ws().await?;
        let items: Vec<(String, String)> = topics
            .iter()
            .map(|t| (t.clone(), data(node.id(), t, 0)))
            .collect();
        publish_acked(&mut publisher, &items).await?;
        want.extend(items.into_iter().map(|(_, d)| d));
    }
    every_node_owns_topics(cluster).await?;
    for sub in &mut subs {
        sub.wait_for(&want, DELIVERY_TIMEOUT).await?;
    }
    Ok(())
}

/// Once the links are idle, [`cross_traffic`], then waits until every
/// link is up and counted it ([`traffic_counted`]); returns that view.
async fn counted_traffic(cluster: &Cluster, round: &str) -> Result<PeerView> {
    let ids = cluster.live_ids();
    let before = settled_peer_view(cluster).await?;
    cross_traffic(cluster, round).await?;
    let what = format!("the {round} traffic counted on every link");
    wait_peer_view(cluster, &what, LINK_TIMEOUT, |v| {
        all_linked(&ids, v)?;
        traffic_counted(&before, v)
    })
    .await
}

#[tokio::test]
async fn per_peer_metrics_follow_the_traffic_and_a_restart() -> Result<()> {
    let mut cluster = Cluster::start(3, |b| b).await?;
    let ids = cluster.live_ids();
    wait_peer_view(
        &cluster,
        "every node linked to both others",
        LINK_TIMEOUT,
        |v| all_linked(&ids, v),
    )
    .await?;
    let after = counted_traffic(&cluster, "first").await?;
    // Every node has three ready members and timed the deliveries it made.
    let before_kill = wait_scraped(
        &cluster,
        "three ready members and timed deliveries",
        LINK_TIMEOUT,
        cluster_metrics,
        |v| {
            for (node, c) in v {
                ensure!(c.ready == 3.0 && c.delivered > 0.0, "{node}: {c:?}");
            }
            Ok(())
        },
    )
    .await?;

    // kill -9 n3: both survivors see its link go down (idle timeout) and
    // keep theirs.
    cluster.kill9(2).await?;
    let survivors = [("n1", "n2"), ("n2", "n1")];
    wait_peer_view(&cluster, "n3 down on the survivors", FAILOVER_BOUND, |v| {
        for (node, other) in survivors {
            let peers = v.get(node).with_context(|| format!("no view of {node}"))?;
            let n3 = peers.get("n3").context("n3 no longer listed")?;
            ensure!(
                n3.connected == 0.0 && n3.rtt_seconds.is_none(),
                "{node}: n3 {n3:?}"
            );
            let link = peers
                .get(other)
                .with_context(|| format!("{other} not listed"))?;
            ensure!(link.connected == 1.0, "{node}: {other} {link:?}");
        }
        Ok(())
    })
    .await?;
    // ... count two ready members and recompute their ring without it.
    wait_scraped(
        &cluster,
        "n3 off the survivors' members and rings",
        FAILOVER_BOUND,
        cluster_metrics,
        |v| {
            for (node, _) in survivors {
                let (was, is) = (before_kill[node], v[node]);
                ensure!(
                    is.ready == 2.0 && is.ring_changes > was.ring_changes,
                    "{node}: {was:?} then {is:?}"
                );
            }
            Ok(())
        },
    )
    .await?;

    // Restarted, n3 is linked again: the survivors count a reconnection
    // (and none between themselves), and their counters for n3 carried on.
    cluster.restart(2).await?;
    cluster.wait_converged(CONVERGE_TIMEOUT).await?;
    wait_peer_view(&cluster, "n3 linked again", LINK_TIMEOUT, |v| {
        all_linked(&ids, v)?;
        for (node, other) in survivors {
            let (was, is) = (after[node]["n3"], v[node]["n3"]);
            ensure!(
                is.reconnects > was.reconnects,
                "{node}: n3 reconnects {} then {}",
                was.reconnects,
                is.reconnects
            );
            ensure!(
                is.sent_frames >= was.sent_frames
                    && is.sent_bytes >= was.sent_bytes
                    && is.received_frames >= was.received_frames
                    && is.received_bytes >= was.received_bytes,
                "{node}: n3 counters went back: {was:?} then {is:?}"
            );
            let (was, is) = (after[node][other], v[node][other]);
            ensure!(
                is.reconnects == was.reconnects,
                "{node}: {other} reconnected: {was:?} then {is:?}"
            );
        }
        Ok(())
    })
    .await?;

    // The new links count traffic like the old ones.
    counted_traffic(&cluster, "second").await?;
    Ok(())
}

/// Sends `count` unacknowledged publishes spread over `topics` as fast as
/// the socket takes them, then a ping: its pong means the node took them
/// all. Returns the data strings sent.
async fn flood(
    ws: &mut WsClient,
    tag: &str,
    topics: &[String],
    count: usize,
) -> Result<Vec<String>> {
    let mut sent = Vec::with_capacity(count);
    for i in 0..count {
        let topic = &topics[i % topics.len()];
        let d = data(tag, topic, i);
        ws.feed_json(json!({"op": "pub", "topic": topic, "data": d}))
            .await?;
        sent.push(d);
        if i % 64 == 63 {
            ws.flush().await?;
        }
    }
    let id = ws.fresh_id();
    ws.send_json(json!({"op": "ping", "id": id})).await?;
    ws.expect_pong(id)
        .await
        .with_context(|| format!("{tag}: pong after {count} publishes"))?;
    Ok(sent)
}

/// Every node's dropped frames and backlog waits and timeouts, as one line;
/// and the frames dropped in all.
async fn backlog_counts(cluster: &Cluster) -> Result<(String, f64)> {
    let mut counts = Vec::new();
    let mut dropped = 0.0;
    for node in &cluster.nodes {
        let m = node.metrics().await?;
        dropped += m.sum("herald_peer_frames_dropped_total");
        counts.push(format!(
            "{}: dropped {} backlog waits {} timeouts {}",
            node.id(),
            m.sum("herald_peer_frames_dropped_total"),
            m.sum("herald_publish_backlog_waits_total"),
            m.sum("herald_publish_backlog_timeouts_total")
        ));
    }
    Ok((counts.join("; "), dropped))
}

/// A topic's owner forwards other nodes' publishes: when its link to a
/// subscriber's node backs up, it gossips that, and the publishers' node
/// holds them back as it does for its own links. Here n1 floods topics that
/// n2 owns, for a subscriber on n3, and n3 stops reading for a while
/// (SIGSTOP): n1's own links stay clear, so only n2's word can slow n1. No
/// node drops a frame, and every message arrives in order.
#[tokio::test]
async fn an_owner_whose_link_backs_up_slows_the_publishers_of_other_nodes() -> Result<()> {
    const MESSAGES: usize = 8000;
    let cluster = Cluster::start(3, |b| {
        b.flag("--cluster-peer-queue-frames", "2048")
            .flag("--gossip-interval", "20ms")
            // The stopped node must not be taken for dead meanwhile.
            .flag("--gossip-phi-threshold", "1000")
            .flag("--cluster-idle-timeout", "15s")
            .flag("--cluster-request-timeout", "15s")
            // The test's subscriber reads the backlog at its own pace.
            .flag("--client-outbound-queue", "100000")
    })
    .await?;
    // Topics n2 owns: an exact subscription makes its owner hold the topic
    // (`herald_topics`), and nobody else.
    let mut sub = Subscriber::connect(&cluster.nodes[2], "sub").await?;
    let mut owned_by_n2 = Vec::new();
    let mut held = [0.0; 3];
    for topic in topics("congest", 60) {
        sub.sub_all(std::slice::from_ref(&topic)).await?;
        let mut now = [0.0; 3];
        for (i, node) in cluster.nodes.iter().enumerate() {
            now[i] = node.metrics().await?.sum("herald_topics");
        }
        if now[1] > held[1] {
            owned_by_n2.push(topic);
        }
        held = now;
        if owned_by_n2.len() == 10 {
            break;
        }
    }
    ensure!(owned_by_n2.len() == 10, "n2 owns only {owned_by_n2:?}");
    // A long tag makes each frame about 1 KiB, so that the stopped node's
    // QUIC receive window takes fewer of them.
    let tag = format!("p{}", "x".repeat(1000));
    let mut ws = cluster.nodes[0].ws().await?;
    let publisher = {
        let topics = owned_by_n2.clone();
        tokio::spawn(async move { flood(&mut ws, &tag, &topics, MESSAGES).await })
    };
    cluster.nodes[2].freeze().await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.nodes[2].signal(libc::SIGCONT)?;
    let want: BTreeSet<String> = publisher
        .await
        .context("publisher task")??
        .into_iter()
        .collect();
    let waited = sub.wait_for(&want, Duration::from_secs(60)).await;
    let (counts, dropped) = backlog_counts(&cluster).await?;
    waited.with_context(|| counts.clone())?;
    ensure!(dropped == 0.0, "frames were dropped: {counts}");
    sub.check_order(false)?;
    Ok(())
}

/// Publishers faster than the links between nodes (unacknowledged
/// publishes, as fast as their sockets take them) are slowed, not dropped:
/// with small peer queues every message reaches a subscriber on another
/// node, no node drops a frame, and the ingress node counts the waits.
#[tokio::test]
async fn publishers_faster_than_the_links_are_slowed_instead_of_dropped() -> Result<()> {
    const PER_PUBLISHER: usize = 2000;
    let cluster = Cluster::start(3, |b| b.flag("--cluster-peer-queue-frames", "256")).await?;
    let topics = topics("flood", 30);
    let mut sub = Subscriber::connect(&cluster.nodes[2], "sub").await?;
    sub.sub_all(&topics).await?;
    let mut floods = Vec::new();
    for k in 0..3 {
        let mut ws = cluster.nodes[0].ws().await?;
        let topics = topics.clone();
        floods.push(tokio::spawn(async move {
            flood(&mut ws, &format!("p{k}"), &topics, PER_PUBLISHER).await
        }));
    }
    let mut want = BTreeSet::new();
    for flood in floods {
        want.extend(flood.await.context("publisher task")??);
    }
    if let Err(e) = sub.wait_for(&want, Duration::from_secs(30)).await {
        return Err(e.context(backlog_counts(&cluster).await?.0));
    }
    sub.check_order(false)?;
    let ingress = cluster.nodes[0].metrics().await?;
    ensure!(
        ingress.sum("herald_publish_backlog_waits_total") > 0.0,
        "the links never backed up, so this test proved nothing"
    );
    for node in &cluster.nodes {
        let m = node.metrics().await?;
        for name in [
            "herald_peer_frames_dropped_total",
            "herald_owner_unavailable_total",
        ] {
            ensure!(
                m.sum(name) == 0.0,
                "{}: {name} = {}",
                node.id(),
                m.sum(name)
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_publish_during_an_owner_outage_is_answered_in_bounded_time() -> Result<()> {
    // The owner is frozen (SIGSTOP) and gossip never calls it dead (a huge
    // phi threshold): it stays on the rings until its QUIC connections
    // time out (3 s), so until then a request to it can only end by the
    // request timeout (1 s).
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
    let cluster = Cluster::start(3, |b| {
        b.flag("--cluster-request-timeout", "1s")
            .flag("--gossip-phi-threshold", "1000000")
    })
    .await?;
    let topics = topics("outage", 30);
    let mut publisher = cluster.nodes[0].ws().await?;
    let items: Vec<(String, String)> = topics
        .iter()
        .map(|t| (t.clone(), data("warm", t, 0)))
        .collect();
    publish_acked(&mut publisher, &items).await?;
    every_node_owns_topics(&cluster).await?;

    cluster.nodes[2].freeze().await?;
    let frozen = Instant::now();
    // Every reply comes within the request timeout plus slack.
    let bound = REQUEST_TIMEOUT + Duration::from_millis(1500);
    let mut rounds = 0;
    let mut unavailable = 0;
    let mut slowest = Duration::ZERO;
    let mut http_statuses = BTreeMap::new();
    // Publish rounds (with id) to every topic until a round is all acked.
    loop {
        let items: Vec<(String, String)> = topics
            .iter()
            .map(|t| (t.clone(), data("outage", t, rounds)))
            .collect();
        let sent = Instant::now();
        let replies = publish_all(&mut publisher, &items, bound)
            .await
            .with_context(|| format!("round {rounds}, {:?} after the freeze", frozen.elapsed()))?;
        slowest = slowest.max(sent.elapsed());
        let refused = replies
            .iter()
            .filter(|r| matches!(r, PubReply::Unavailable))
            .count();
        unavailable += refused;
        // HTTP publish, on another node, is bounded the same way.
        if rounds == 0 {
            let node = &cluster.nodes[1];
            let posts = topics.iter().map(|t| async move {
                let started = Instant::now();
                let resp = node
                    .http_publish(t, Some("application/json"), b"1", &[])
                    .await;
                (t, started.elapsed(), resp)
            });
            for (t, took, resp) in futures_util::future::join_all(posts).await {
                let resp = resp.with_context(|| format!("HTTP publish to {t}"))?;
                ensure!(
                    (resp.status == 200 || resp.status == 503) && took <= bound,
                    "HTTP publish to {t}: {} {} after {took:?}",
                    resp.status,
                    resp.text()
                );
                *http_statuses.entry(resp.status).or_insert(0) += 1;
            }
        }
        rounds += 1;
        if refused == 0 {
            break;
        }
        ensure!(
            frozen.elapsed() < FAILOVER_BOUND,
            "{refused} topics still unavailable {:?} after the owner froze",
            frozen.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "outage: {rounds} rounds, {unavailable} unavailable, slowest round {slowest:?}, \
         HTTP statuses {http_statuses:?}, all acked {:?} after the freeze",
        frozen.elapsed()
    );
    if unavailable == 0 || !http_statuses.contains_key(&503) {
        // Say what each live node's ring and log showed. (This once came of
        // a frozen node still running for a few ms after `kill`; `freeze`
        // now waits for every thread to stop.)
        let mut seen = String::new();
        for node in &cluster.nodes[..2] {
            let owners = node.ring_owners().await?;
            let events: Vec<String> = node
                .log()
                .lines()
                .filter(|l| ["ring changed", "peer "].iter().any(|e| l.contains(e)))
                .map(str::to_owned)
                .collect();
            seen += &format!("\n{}: ring {owners:?}; {}", node.id(), events.join("\n  "));
        }
        bail!("no publish was refused: the frozen node owned nothing?{seen}");
    }
    // Each refusal was counted where the request came in.
    for (node, refused) in [(0, unavailable), (1, http_statuses[&503])] {
        let counted = cluster.nodes[node]
            .metrics()
            .await?
            .sum("herald_owner_unavailable_total");
        ensure!(
            counted >= refused as f64,
            "node {node}: {refused} refused, herald_owner_unavailable_total {counted}"
        );
    }
    Ok(())
}

/// For `watch`, polls every node in `nodes` that `id` is never on its ring
/// (and, with `not_listed`, not among its members either).
async fn stays_out(nodes: &[&Node], id: &str, not_listed: bool, watch: Duration) -> Result<()> {
    let deadline = Instant::now() + watch;
    while Instant::now() < deadline {
        for node in nodes {
            let view = node.cluster_view().await?;
            ensure!(
                !ring_owners(&view).contains(id),
                "{id} is on {}'s ring: {view}",
                node.id()
            );
            if not_listed {
                ensure!(
                    member_state(&view, id).is_none(),
                    "{id} is a member on {}: {view}",
                    node.id()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The join timeout given to outsiders: they have seeds but no peer they
/// can connect to, so they are "joining" until then (and serve alone after).
const OUTSIDER_JOIN_TIMEOUT: &str = "3s";

/// The outsider answers `/readyz` 503 "joining" for the first 2 s (well
/// inside its join timeout).
async fn joining_until_join_timeout(node: &Node) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let (status, body) = node.readyz().await?;
        ensure!(
            status == 503
                && body["reasons"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|x| x == "joining")),
            "{}: /readyz {status} {body} before its join timeout",
            node.id()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Publishes from the outsider reach no subscriber in the cluster, and the
/// cluster's publishes do not reach the outsider's subscriber.
async fn outsider_is_cut_off(cluster: &Cluster, outsider: &Node, prefix: &str) -> Result<()> {
    let topics = topics(prefix, 12);
    let mut inside = Subscriber::connect(&cluster.nodes[0], "inside").await?;
    inside.sub_all(&topics).await?;
    let mut outside = Subscriber::connect(outsider, "outside").await?;
    for topic in &topics {
        // Answered one way or the other: its own ring, or unavailable.
        let id = outside.ws.fresh_id();
        outside
            .ws
            .send_json(json!({"op": "sub", "id": id, "topic": topic}))
            .await?;
        let v = outside.ws.recv().await?;
        ensure!(
            v["id"] == id && (v["op"] == "ok" || v["code"] == "unavailable"),
            "outsider sub {topic}: {v}"
        );
    }
    let mut from_outside = outsider.ws().await?;
    let items: Vec<(String, String)> = topics
        .iter()
        .map(|t| (t.clone(), data("outsider", t, 0)))
        .collect();
    publish_all(&mut from_outside, &items, Duration::from_secs(6)).await?;
    let mut from_inside = cluster.nodes[1].ws().await?;
    let items: Vec<(String, String)> = topics
        .iter()
        .map(|t| (t.clone(), data("insider", t, 0)))
        .collect();
    publish_acked(&mut from_inside, &items).await?;
    let want: BTreeSet<String> = items.into_iter().map(|(_, d)| d).collect();
    inside.wait_for(&want, DELIVERY_TIMEOUT).await?;
    inside.quiet().await?;
    ensure!(
        inside.data_seen() == want,
        "the cluster's subscriber got the outsider's messages: {:?}",
        inside.data_seen()
    );
    // The outsider's own subscriber may get the outsider's own messages
    // (it serves alone); never the cluster's.
    while outside.recv_msg(QUIET).await.is_ok() {}
    ensure!(
        outside.got.iter().all(|m| !m["data"]
            .as_str()
            .unwrap_or_default()
            .starts_with("insider")),
        "the outsider's subscriber got the cluster's messages: {:?}",
        outside.got
    );
    Ok(())
}

#[tokio::test]
async fn a_node_with_a_certificate_from_another_ca_is_refused() -> Result<()> {
    let cluster = Cluster::start(2, |b| b).await?;
    let other = Ca::new()?;
    let cert = other.node("n3")?;
    let outsider = NodeBuilder::new("n3")
        .cluster_tls(&cert)
        .cluster_timings()
        .flag("--cluster-join-timeout", OUTSIDER_JOIN_TIMEOUT)
        .seed(cluster.nodes[0].gossip_addr())
        .start()
        .await?;
    let insiders: Vec<&Node> = cluster.nodes.iter().collect();
    let (joining, out) = tokio::join!(
        joining_until_join_timeout(&outsider),
        // Past its join timeout (when it calls itself ready) and a few
        // gossip rounds: never placed.
        stays_out(&insiders, "n3", false, Duration::from_secs(5))
    );
    joining?;
    out?;
    let ring = outsider.ring_owners().await?;
    ensure!(
        !ring.contains("n1") && !ring.contains("n2"),
        "the outsider placed a member it cannot authenticate: {ring:?}"
    );
    outsider_is_cut_off(&cluster, &outsider, "ca").await?;
    stays_out(&insiders, "n3", false, Duration::from_millis(500)).await?;
    Ok(())
}

#[tokio::test]
async fn a_node_with_another_cluster_name_stays_out() -> Result<()> {
    let cluster = Cluster::start(2, |b| b).await?;
    let outsider = NodeBuilder::new("n3")
        .shared_cluster_tls()?
        .cluster_timings()
        .flag("--cluster-join-timeout", OUTSIDER_JOIN_TIMEOUT)
        .flag("--cluster-name", "elsewhere")
        .seed(cluster.nodes[0].gossip_addr())
        .start()
        .await?;
    let insiders: Vec<&Node> = cluster.nodes.iter().collect();
    let (joining, out) = tokio::join!(
        joining_until_join_timeout(&outsider),
        stays_out(&insiders, "n3", true, Duration::from_secs(5))
    );
    joining?;
    out?;
    let view = outsider.cluster_view().await?;
    for id in ["n1", "n2"] {
        ensure!(
            member_state(&view, id).is_none() && !ring_owners(&view).contains(id),
            "the outsider lists {id}: {view}"
        );
    }
    outsider_is_cut_off(&cluster, &outsider, "name").await?;
    stays_out(&insiders, "n3", true, Duration::from_millis(500)).await?;
    Ok(())
}

#[tokio::test]
async fn seeds_without_tls_refuse_to_start_and_say_why() -> Result<()> {
    let seed = "127.0.0.1:9".parse()?;
    let cert = Ca::shared()?.node("n1")?;
    let ca = cert.ca.to_string_lossy().into_owned();
    let crt = cert.cert.to_string_lossy().into_owned();
    // Nothing, then a CA and a certificate without the key.
    for (given, missing) in [
        (vec![], "cluster.ca"),
        (
            vec!["--cluster-ca", ca.as_str(), "--cluster-cert", crt.as_str()],
            "cluster.key",
        ),
    ] {
        let (status, log) = NodeBuilder::new("n1")
            .seed(seed)
            .args(given.iter().copied())
            .run_to_exit(Duration::from_secs(10))
            .await?;
        ensure!(
            !status.success(),
            "started with seeds and {given:?}: {status}"
        );
        ensure!(
            log.contains(missing),
            "with {given:?}, the refusal does not name {missing}: {log}"
        );
    }
    Ok(())
}
