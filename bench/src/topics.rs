//! The topics scenario: T topics, each with K subscribers, where every
//! message crosses nodes.
//!
//! With U URLs (one per node), the subscribers of topic `t` connect to
//! `urls[t % U]` and its publisher to `urls[(t + 1) % U]`, so with two or
//! more nodes no topic has its publisher and subscribers on one node. P
//! publisher connections (default U) run in this process; connection `p`
//! is on `urls[p % U]` and publishes the topics whose publisher URL is its
//! own, shared round robin among the connections on that URL. N messages are
//! spread over the topics (topic `t` gets `N / T`, plus one for the first
//! `N % T` topics); each topic's payload indices run from 0, so loss,
//! duplicates and order are checked per topic, and for Herald the `seq` of
//! each topic as well. Subscribers run in `--sub-procs` child processes.
//! Throughput is deliveries received divided by the time from the first
//! publish to the last delivery.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::fanout::settle;
use crate::group::{spawn_subscribers, DoneCommand, GroupReport, Layout, ReadyReport, TopicIssue};
use crate::load::LoadArgs;
use crate::payload;
use crate::publisher::{self, PublishPlan, PublishReport};
use crate::session::{Codec, SubscriberSettings, Target};
use crate::stats::{fmt_ns, new_histogram, DeliveryTally, LatencySummary};

/// Topics listed in the summary's `issues` at most (the worst first).
const LISTED_ISSUES: usize = 20;

/// Options of `herald-bench topics`.
#[derive(Debug, Clone, Args)]
pub struct TopicsArgs {
    /// WebSocket URL of each node (repeatable). Topic t's subscribers use
    /// URL t % U, its publisher URL (t + 1) % U.
    /// Default: ws://127.0.0.1:7400/ws for herald, ws://127.0.0.1:8080 for nats.
    #[arg(long)]
    pub url: Vec<String>,
    /// Number of topics (NATS subjects).
    #[arg(short = 't', long, default_value_t = 1000)]
    pub topics: usize,
    /// Subscriber connections per topic.
    #[arg(short = 'k', long, default_value_t = 1)]
    pub subscribers_per_topic: usize,
    /// Publisher connections (0: one per URL). At least one per URL.
    #[arg(short = 'p', long, default_value_t = 0)]
    pub publishers: usize,
    /// Messages to publish in all, spread evenly over the topics.
    #[arg(short = 'n', long, default_value_t = 20_000)]
    pub messages: u64,
    /// Topic name prefix (topics are PREFIX.0, PREFIX.1, ...); default: a fresh one per run.
    #[arg(long)]
    pub prefix: Option<String>,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Topic names, message counts, and which URL and publisher each topic gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicLayout {
    pub prefix: String,
    pub topics: usize,
    pub per_topic: usize,
    /// Messages over all topics.
    pub messages: u64,
}

impl TopicLayout {
    pub fn topic_name(&self, t: usize) -> String {
        format!("{}.{t}", self.prefix)
    }

    /// Messages published to topic `t`.
    pub fn messages_of(&self, t: usize) -> u64 {
        let topics = self.topics as u64;
        self.messages / topics + u64::from((t as u64) < self.messages % topics)
    }

    /// The topic of subscriber `n` (subscribers of one topic are consecutive).
    pub fn topic_of_subscriber(&self, n: usize) -> usize {
        n / self.per_topic.max(1)
    }

    /// Index of the URL that topic `t`'s subscribers use.
    pub fn subscriber_url(&self, t: usize, urls: usize) -> usize {
        t % urls.max(1)
    }

    /// Index of the URL that topic `t`'s publisher uses.
    pub fn publisher_url(&self, t: usize, urls: usize) -> usize {
        (t + 1) % urls.max(1)
    }

    /// The publisher connection of topic `t`, with `publishers >= urls`
    /// connections where connection `p` is on URL `p % urls`.
    pub fn publisher_of(&self, t: usize, urls: usize, publishers: usize) -> usize {
        let urls = urls.max(1);
        let u = self.publisher_url(t, urls);
        // Connections on URL u: u, u + urls, u + 2 urls, ... below `publishers`.
        let on_url = publishers.saturating_sub(u).div_ceil(urls).max(1);
        u + urls * ((t / urls) % on_url)
    }
}

/// Publishing figures summed over the publisher connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishTotals {
    pub connections: usize,
    pub sent: u64,
    pub confirmed: u64,
    pub server_errors: u64,
    pub first_error: Option<String>,
    pub max_behind_ns: u64,
    pub first_send_ns: u64,
    pub last_send_ns: u64,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct TopicsSummary {
    pub target: Target,
    pub codec: Option<Codec>,
    pub urls: usize,
    pub topics: usize,
    pub subscribers_per_topic: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub subscribed: usize,
    pub messages: u64,
    pub payload_bytes: usize,
    pub rate: f64,
    pub publish: PublishTotals,
    pub publish_secs: f64,
    pub delivery_secs: f64,
    /// Deliveries the subscribers should have received in all.
    pub expected_deliveries: u64,
    pub deliveries_per_sec: f64,
    pub latency: LatencySummary,
    pub tally: DeliveryTally,
    /// Topics where some subscriber saw loss, duplicates, disorder or a disconnect.
    pub topics_with_issues: usize,
    pub topics_with_loss: usize,
    pub topics_with_duplicates: usize,
    pub topics_out_of_order: usize,
    /// The worst topics (most lost first), at most 20.
    pub issues: Vec<TopicIssue>,
}

/// Runs the scenario and prints its figures.
pub async fn run(args: TopicsArgs) -> Result<TopicsSummary> {
    if args.topics == 0 || args.subscribers_per_topic == 0 {
        bail!("need at least one topic and one subscriber per topic");
    }
    if args.messages < args.topics as u64 {
        bail!("--messages must be at least --topics (every topic gets a message)");
    }
    if args.messages > 50_000_000 {
        bail!("--messages is capped at 50,000,000");
    }
    let subscribers = args
        .topics
        .checked_mul(args.subscribers_per_topic)
        .filter(|&s| s <= 1_000_000)
        .ok_or_else(|| anyhow::anyhow!("topics x subscribers per topic is capped at 1,000,000"))?;
    let urls = if args.url.is_empty() {
        vec![args.load.target.default_url().to_string()]
    } else {
        args.url.clone()
    };
    let publishers = if args.publishers == 0 {
        urls.len()
    } else {
        args.publishers
    };
    if publishers < urls.len() {
        bail!(
            "--publishers ({publishers}) must be at least the number of URLs ({}): one per node",
            urls.len()
        );
    }
    if urls.len() == 1 {
        eprintln!("note: one URL: every topic's subscribers and publisher share a node");
    }
    let layout = TopicLayout {
        prefix: args.prefix.clone().unwrap_or_else(|| {
            format!(
                "bench.topics.{}.{}",
                std::process::id(),
                crate::clock::now_ns() % 1_000_000_000
            )
        }),
        topics: args.topics,
        per_topic: args.subscribers_per_topic,
        messages: args.messages,
    };
    let max_per_topic = layout.messages_of(0);
    if args.load.payload_bytes < payload::header_len(max_per_topic) {
        eprintln!(
            "note: payloads need {} bytes for index and timestamp; they will be that long",
            payload::header_len(max_per_topic)
        );
    }
    let settings = SubscriberSettings {
        target: args.load.target,
        codec: args.load.codec,
        parse: args.load.parse,
    };
    let timeout = Duration::from_secs_f64(args.load.timeout_secs);

    // The publish plans, one per connection, built first so that a bad
    // layout fails before any connection opens.
    let mut plans: Vec<(PublishPlan, Vec<usize>)> = (0..publishers)
        .map(|p| {
            (
                PublishPlan {
                    target: args.load.target,
                    codec: args.load.codec,
                    url: urls[p % urls.len()].clone(),
                    topics: Vec::new(),
                    counts: Vec::new(),
                    payload_bytes: args.load.payload_bytes,
                    rate: 0.0,
                    window: args.load.window,
                    confirm: args.load.confirm,
                    confirm_timeout: Duration::from_secs(30),
                },
                Vec::new(),
            )
        })
        .collect();
    for t in 0..layout.topics {
        let (plan, ids) = &mut plans[layout.publisher_of(t, urls.len(), publishers)];
        plan.topics.push(layout.topic_name(t));
        plan.counts.push(layout.messages_of(t));
        ids.push(t);
    }
    plans.retain(|(plan, _)| !plan.topics.is_empty());
    for (plan, _) in &mut plans {
        let share: u64 = plan.counts.iter().sum();
        plan.rate = args.load.rate * share as f64 / args.messages as f64;
    }
    let mut per_url = vec![(0usize, 0usize, 0u64); urls.len()];
    for t in 0..layout.topics {
        per_url[layout.subscriber_url(t, urls.len())].0 += layout.per_topic;
    }
    for (plan, _) in &plans {
        let u = urls.iter().position(|x| *x == plan.url).unwrap_or(0);
        per_url[u].1 += 1;
        per_url[u].2 += plan.counts.iter().sum::<u64>();
    }
    for (u, (subs, pubs, msgs)) in per_url.iter().enumerate() {
        eprintln!(
            "node {u} ({}): {subs} subscribers, {pubs} publisher connections sending {msgs} messages",
            urls[u]
        );
    }

    let mut workers = spawn_subscribers(
        &args.load,
        &settings,
        &urls,
        Layout::Topics(layout.clone()),
        subscribers,
    )?;

    let ready = ReadyReport::gather(&mut workers, timeout).await?;
    settle(args.load.settle_secs, args.load.target, urls.len()).await;

    let mut tasks = Vec::with_capacity(plans.len());
    for (plan, ids) in plans {
        tasks.push((
            ids,
            tokio::spawn(async move { publisher::publish(&plan).await }),
        ));
    }
    let mut publish = PublishTotals {
        first_send_ns: u64::MAX,
        ..PublishTotals::default()
    };
    let mut final_seqs = vec![None; layout.topics];
    let mut publish_error = None;
    for (ids, task) in tasks {
        let report: Result<PublishReport> = match task.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("publisher task failed: {e}")),
        };
        match report {
            Ok(r) => {
                publish.connections += 1;
                publish.sent += r.sent;
                publish.confirmed += r.confirmed;
                publish.server_errors += r.server_errors;
                if publish.first_error.is_none() {
                    publish.first_error = r.first_error;
                }
                publish.max_behind_ns = publish.max_behind_ns.max(r.max_behind_ns);
                if r.sent > 0 {
                    publish.first_send_ns = publish.first_send_ns.min(r.first_send_ns);
                    publish.last_send_ns = publish.last_send_ns.max(r.last_send_ns);
                }
                for (slot, seq) in r.final_seqs.into_iter().enumerate() {
                    if let Some(&t) = ids.get(slot) {
                        final_seqs[t] = seq;
                    }
                }
            }
            Err(e) => {
                eprintln!("publisher: {e:#}");
                publish_error.get_or_insert(e);
            }
        }
    }
    let done = DoneCommand {
        final_seqs,
        drain_timeout_ms: (args.load.drain_secs * 1e3) as u64,
    };
    for worker in &mut workers {
        worker.send("DONE", &done).await?;
    }
    if publish.connections == 0 {
        if let Some(e) = publish_error {
            return Err(e.context("every publisher failed"));
        }
    }
    if publish.first_send_ns == u64::MAX {
        publish.first_send_ns = 0;
    }

    let mut histogram = new_histogram();
    let mut tally = DeliveryTally::default();
    let mut issues: BTreeMap<usize, TopicIssue> = BTreeMap::new();
    for mut worker in workers {
        let report: GroupReport = worker.expect("RESULT", timeout).await?;
        tally.merge(&report.tally);
        report.latency.add_to(&mut histogram);
        for issue in &report.issues {
            issues
                .entry(issue.topic_id)
                .or_insert_with(|| TopicIssue {
                    topic_id: issue.topic_id,
                    ..TopicIssue::default()
                })
                .merge(issue);
        }
        let name = worker.name().to_string();
        if let Err(e) = worker.finish(Duration::from_secs(10)).await {
            eprintln!("{name}: {e:#}");
        }
    }

    let delivery_ns = tally
        .last_delivery_ns
        .map_or(0, |last| last.saturating_sub(publish.first_send_ns));
    let delivery_secs = delivery_ns as f64 / 1e9;
    let publish_secs = publish.last_send_ns.saturating_sub(publish.first_send_ns) as f64 / 1e9;
    let issues: Vec<TopicIssue> = issues.into_values().collect();
    let count = |f: fn(&TopicIssue) -> bool| issues.iter().filter(|i| f(i)).count();
    let topics_with_loss = count(|i| i.lost > 0 || i.seq_lost > 0);
    let topics_with_duplicates = count(|i| i.duplicates > 0);
    let topics_out_of_order = count(|i| i.out_of_order > 0 || i.seq_out_of_order > 0);
    let topics_with_issues = issues.len();
    let mut worst = issues;
    worst.sort_by(|a, b| {
        (b.lost + b.duplicates + b.out_of_order, b.disconnected)
            .cmp(&(a.lost + a.duplicates + a.out_of_order, a.disconnected))
            .then(a.topic_id.cmp(&b.topic_id))
    });
    worst.truncate(LISTED_ISSUES);
    let summary = TopicsSummary {
        target: args.load.target,
        codec: (args.load.target == Target::Herald).then_some(args.load.codec),
        urls: urls.len(),
        topics: layout.topics,
        subscribers_per_topic: layout.per_topic,
        publishers,
        subscribers,
        subscribed: ready.subscribed,
        messages: args.messages,
        payload_bytes: args.load.payload_bytes,
        rate: args.load.rate,
        publish,
        publish_secs,
        delivery_secs,
        expected_deliveries: args.messages * layout.per_topic as u64,
        deliveries_per_sec: if delivery_secs > 0.0 {
            tally.received as f64 / delivery_secs
        } else {
            0.0
        },
        latency: LatencySummary::of(&histogram),
        tally,
        topics_with_issues,
        topics_with_loss,
        topics_with_duplicates,
        topics_out_of_order,
        issues: worst,
    };
    print_summary(&summary, &layout);
    if args.load.json {
        println!("JSON {}", serde_json::to_string(&summary)?);
    }
    Ok(summary)
}

fn print_summary(s: &TopicsSummary, layout: &TopicLayout) {
    let codec = s
        .codec
        .map(|c| format!(" codec={c:?}").to_lowercase())
        .unwrap_or_default();
    let rate = if s.rate > 0.0 {
        format!("{} msg/s", s.rate)
    } else {
        "max".to_string()
    };
    let p = &s.publish;
    let t = &s.tally;
    let l = &s.latency;
    println!(
        "== topics target={:?}{codec} nodes={} topics={} subscribers={}/{} ({} per topic) publishers={} messages={} payload={} B rate={rate}",
        s.target, s.urls, s.topics, s.subscribed, s.subscribers, s.subscribers_per_topic, p.connections,
        s.messages, s.payload_bytes
    );
    println!(
        "publish:     {} sent in {:.3} s ({:.0} msg/s), {} confirmed{}, max behind schedule {}",
        p.sent,
        s.publish_secs,
        if s.publish_secs > 0.0 {
            p.sent as f64 / s.publish_secs
        } else {
            0.0
        },
        p.confirmed,
        if p.server_errors > 0 {
            format!(
                ", {} errors (first: {})",
                p.server_errors,
                p.first_error.as_deref().unwrap_or("?")
            )
        } else {
            String::new()
        },
        fmt_ns(p.max_behind_ns),
    );
    println!(
        "deliveries:  {} of {} in {:.3} s = {:.0} deliveries/s",
        t.received, s.expected_deliveries, s.delivery_secs, s.deliveries_per_sec
    );
    println!(
        "latency:     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {})",
        fmt_ns(l.p50_ns),
        fmt_ns(l.p90_ns),
        fmt_ns(l.p99_ns),
        fmt_ns(l.p999_ns),
        fmt_ns(l.max_ns),
        fmt_ns(l.mean_ns as u64)
    );
    println!(
        "by index:    lost {}  duplicated {}  out of order {}  malformed {}  foreign {}",
        t.lost, t.duplicates, t.out_of_order, t.malformed, t.beyond_range
    );
    if t.seq_checked_subscribers > 0 {
        println!(
            "by seq:      lost {}  out of order {}  ({} subscribers checked)",
            t.seq_lost, t.seq_out_of_order, t.seq_checked_subscribers
        );
    }
    println!(
        "per topic:   {} of {} with issues: {} with loss, {} with duplicates, {} out of order",
        s.topics_with_issues,
        s.topics,
        s.topics_with_loss,
        s.topics_with_duplicates,
        s.topics_out_of_order
    );
    for i in &s.issues {
        println!(
            "  {}: lost {} dup {} ooo {} seq-lost {} seq-ooo {} disconnected {} errors {}",
            layout.topic_name(i.topic_id),
            i.lost,
            i.duplicates,
            i.out_of_order,
            i.seq_lost,
            i.seq_out_of_order,
            i.disconnected,
            i.errors
        );
    }
    println!(
        "subscribers: {} complete, {} disconnected {:?}, {} errors{}, {} err replies",
        t.complete_subscribers,
        t.disconnected,
        t.close_codes,
        t.errors,
        t.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        t.server_errors
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(topics: usize, per_topic: usize, messages: u64) -> TopicLayout {
        TopicLayout {
            prefix: "p".into(),
            topics,
            per_topic,
            messages,
        }
    }

    #[test]
    fn messages_are_spread_over_topics() {
        let l = layout(3, 1, 10);
        assert_eq!(
            (0..3).map(|t| l.messages_of(t)).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        assert_eq!((0..3).map(|t| l.messages_of(t)).sum::<u64>(), 10);
    }

    #[test]
    fn publishers_and_subscribers_are_on_different_nodes() {
        let l = layout(100, 2, 1000);
        for urls in 2..5 {
            for publishers in urls..3 * urls {
                let mut used = vec![0; publishers];
                for t in 0..l.topics {
                    let p = l.publisher_of(t, urls, publishers);
                    assert!(p < publishers);
                    assert_eq!(p % urls, l.publisher_url(t, urls));
                    assert_ne!(p % urls, l.subscriber_url(t, urls));
                    used[p] += 1;
                }
                // Every connection gets topics when there are enough.
                assert!(used.iter().all(|&n| n > 0), "{urls} {publishers} {used:?}");
            }
        }
    }

    #[test]
    fn subscribers_of_a_topic_are_consecutive() {
        let l = layout(4, 3, 8);
        assert_eq!(
            (0..12)
                .map(|n| l.topic_of_subscriber(n))
                .collect::<Vec<_>>(),
            [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        );
    }
}
