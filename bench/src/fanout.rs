//! The fan-out scenario: S subscribers on one topic, one publisher.
//!
//! Subscribers run in `--sub-procs` child processes (the per-process file
//! limit, and both cores); the publisher runs in this process once every
//! subscription is confirmed. Throughput is deliveries received divided by
//! the time from the first publish to the last delivery.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;

use crate::group::{spawn_subscribers, DoneCommand, GroupReport, Layout, ReadyReport};
use crate::load::LoadArgs;
use crate::payload;
use crate::publisher::{self, PublishPlan, PublishReport};
use crate::session::{Codec, SubscriberSettings, Target};
use crate::stats::{fmt_ns, new_histogram, DeliveryTally, LatencySummary};

/// Options of `herald-bench fanout`.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// WebSocket URL (repeatable; connections are spread round robin; the publisher uses the first).
    /// Default: ws://127.0.0.1:7400/ws for herald, ws://127.0.0.1:8080 for nats.
    #[arg(long)]
    pub url: Vec<String>,
    /// Number of subscriber connections.
    #[arg(short = 's', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Number of messages to publish.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub messages: u64,
    /// Topic (NATS subject); default: a fresh one per run.
    #[arg(long)]
    pub topic: Option<String>,
    /// Also hold this many wildcard subscriptions that match nothing
    /// published (on extra connections, 1,000 each), to show what unrelated
    /// wildcard subscribers cost a publish.
    #[arg(long, default_value_t = 0)]
    pub unrelated_wildcards: usize,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutSummary {
    pub target: Target,
    pub codec: Option<Codec>,
    pub subscribers: usize,
    pub subscribed: usize,
    pub messages: u64,
    pub payload_bytes: usize,
    pub rate: f64,
    pub publish: PublishReport,
    pub publish_secs: f64,
    pub delivery_secs: f64,
    pub deliveries_per_sec: f64,
    pub latency: LatencySummary,
    pub tally: DeliveryTally,
}

/// Runs the scenario and prints its figures.
pub async fn run(args: FanoutArgs) -> Result<FanoutSummary> {
    if args.subscribers == 0 || args.messages == 0 {
        bail!("need at least one subscriber and one message");
    }
    if args.messages > 50_000_000 {
        bail!("--messages is capped at 50,000,000");
    }
    if args.load.payload_bytes < payload::header_len(args.messages) {
        eprintln!(
            "note: payloads need {} bytes for index and timestamp; they will be that long",
            payload::header_len(args.messages)
        );
    }
    let urls = if args.url.is_empty() {
        vec![args.load.target.default_url().to_string()]
    } else {
        args.url.clone()
    };
    let topic = args.topic.clone().unwrap_or_else(|| {
        format!(
            "bench.fanout.{}.{}",
            std::process::id(),
            crate::clock::now_ns() % 1_000_000_000
        )
    });
    let settings = SubscriberSettings {
        target: args.load.target,
        codec: args.load.codec,
        parse: args.load.parse,
    };
    let timeout = Duration::from_secs_f64(args.load.timeout_secs);

    let mut workers = spawn_subscribers(
        &args.load,
        &settings,
        &urls,
        Layout::Fanout {
            topic: topic.clone(),
            messages: args.messages,
        },
        args.subscribers,
    )?;

    let ready = ReadyReport::gather(&mut workers, timeout).await?;
    let unrelated = match args.unrelated_wildcards {
        0 => None,
        count => {
            let held = crate::unrelated::hold(args.load.target, &urls, count).await?;
            eprintln!(
                "holding {} unrelated wildcard subscriptions",
                held.subscriptions()
            );
            Some(held)
        }
    };
    settle(args.load.settle_secs, args.load.target, urls.len()).await;

    let plan = PublishPlan {
        target: args.load.target,
        codec: args.load.codec,
        url: urls[0].clone(),
        topics: vec![topic.clone()],
        counts: vec![args.messages],
        payload_bytes: args.load.payload_bytes,
        rate: args.load.rate,
        window: args.load.window,
        confirm: args.load.confirm,
        confirm_timeout: Duration::from_secs(30),
    };
    let published = publisher::publish(&plan).await;
    let done = DoneCommand {
        final_seqs: vec![published.as_ref().ok().and_then(|p| p.final_seq)],
        drain_timeout_ms: (args.load.drain_secs * 1e3) as u64,
    };
    for worker in &mut workers {
        worker.send("DONE", &done).await?;
    }
    let publish = published?;

    let mut histogram = new_histogram();
    let mut tally = DeliveryTally::default();
    for mut worker in workers {
        let report: GroupReport = worker.expect("RESULT", timeout).await?;
        tally.merge(&report.tally);
        report.latency.add_to(&mut histogram);
        let name = worker.name().to_string();
        if let Err(e) = worker.finish(Duration::from_secs(10)).await {
            eprintln!("{name}: {e:#}");
        }
    }
    // Held until every delivery was counted.
    drop(unrelated);

    let delivery_ns = tally
        .last_delivery_ns
        .map_or(0, |last| last.saturating_sub(publish.first_send_ns));
    let delivery_secs = delivery_ns as f64 / 1e9;
    let publish_secs = publish.last_send_ns.saturating_sub(publish.first_send_ns) as f64 / 1e9;
    let summary = FanoutSummary {
        target: args.load.target,
        codec: (args.load.target == Target::Herald).then_some(args.load.codec),
        subscribers: args.subscribers,
        subscribed: ready.subscribed,
        messages: args.messages,
        payload_bytes: args.load.payload_bytes,
        rate: args.load.rate,
        publish,
        publish_secs,
        delivery_secs,
        deliveries_per_sec: if delivery_secs > 0.0 {
            tally.received as f64 / delivery_secs
        } else {
            0.0
        },
        latency: LatencySummary::of(&histogram),
        tally,
    };
    print_summary(&summary);
    if args.load.json {
        println!("JSON {}", serde_json::to_string(&summary)?);
    }
    Ok(summary)
}

/// Waits `secs` (or the target's default) before publishing.
pub async fn settle(secs: Option<f64>, target: Target, urls: usize) {
    let secs = secs.unwrap_or(match target {
        Target::Nats if urls > 1 => 1.0,
        _ => 0.0,
    });
    if secs > 0.0 {
        eprintln!("settling {secs} s before publishing");
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }
}

fn print_summary(s: &FanoutSummary) {
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
        "== fanout target={:?}{codec} subscribers={}/{} messages={} payload={} B rate={rate}",
        s.target, s.subscribed, s.subscribers, s.messages, s.payload_bytes
    );
    println!(
        "publish:     {} sent in {:.3} s ({:.0} msg/s), {} confirmed{}{}, max behind schedule {}",
        p.sent,
        s.publish_secs,
        if s.publish_secs > 0.0 {
            p.sent as f64 / s.publish_secs
        } else {
            0.0
        },
        p.confirmed,
        p.final_seq
            .map(|q| format!(", final seq {q}"))
            .unwrap_or_default(),
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
        t.received,
        t.expected * s.subscribed as u64,
        s.delivery_secs,
        s.deliveries_per_sec
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
