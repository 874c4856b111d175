//! `compare`: one scenario against Herald and against NATS in the same run,
//! and the Herald/NATS ratios.
//!
//! The scenario's own `--target` and `--url` are replaced by `herald` with
//! the `--herald-url`s and `nats` with the `--nats-url`s; everything else
//! (subscribers, messages, rate, payload) is the same for both. Each run
//! prints its usual summary; then a table of both and the ratios, a
//! `ROW |...|` line (a Markdown table row) and a `GENERATOR_CPU |...|` line
//! (this process's CPU seconds in each run) that scripts collect.
//!
//! Ratios are Herald divided by NATS: above 1 for throughput means Herald
//! delivered more per second; above 1 for latency means Herald was slower.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::clock;
use crate::fanout::{self, FanoutArgs};
use crate::session::Target;
use crate::stats::fmt_ns;
use crate::topics::{self, TopicsArgs};

/// Options of `herald-bench compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Herald WebSocket URL (repeatable, one per node).
    #[arg(long = "herald-url", required = true)]
    pub herald_urls: Vec<String>,
    /// NATS WebSocket URL (repeatable, one per server).
    #[arg(long = "nats-url", required = true)]
    pub nats_urls: Vec<String>,
    /// Name of the scenario in the table row (default: the scenario's kind).
    #[arg(long)]
    pub label: Option<String>,
    /// Run NATS first.
    #[arg(long)]
    pub nats_first: bool,
    /// Pause between the two runs, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub pause_secs: f64,
    /// Also print the comparison as one `COMPARE {...}` JSON line.
    #[arg(long)]
    pub json: bool,
    /// The scenario (its `--target` and `--url` are ignored).
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// A scenario that can be compared.
#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// Fan-out: S subscribers on one topic, one publisher.
    Fanout(FanoutArgs),
    /// Topics: T topics, every message crossing nodes.
    Topics(TopicsArgs),
}

/// The figures compared, from either scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub deliveries_per_sec: f64,
    pub expected: u64,
    pub received: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub subscribers: usize,
    /// Subscribers whose subscription was confirmed (the others count in no figure).
    pub subscribed: usize,
    /// By payload index, over the subscribed subscribers.
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub disconnected: u64,
    pub publish_errors: u64,
    /// CPU seconds the load generator used for the run (connecting,
    /// publishing, receiving, checking), on the brokers' machine.
    pub generator_cpu_secs: f64,
}

/// Herald divided by NATS.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub deliveries_per_sec: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Comparison {
    label: String,
    herald: Result<Figures, String>,
    nats: Result<Figures, String>,
    ratios: Option<Ratios>,
}

/// Runs the scenario against both brokers and prints the ratios.
pub async fn run(args: CompareArgs) -> Result<()> {
    let label = args.label.clone().unwrap_or_else(|| match args.scenario {
        Scenario::Fanout(_) => "fanout".to_string(),
        Scenario::Topics(_) => "topics".to_string(),
    });
    let order = if args.nats_first {
        [Target::Nats, Target::Herald]
    } else {
        [Target::Herald, Target::Nats]
    };
    let mut herald = Err("not run".to_string());
    let mut nats = Err("not run".to_string());
    for (i, target) in order.into_iter().enumerate() {
        if i > 0 && args.pause_secs > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(args.pause_secs)).await;
        }
        let urls = match target {
            Target::Herald => args.herald_urls.clone(),
            Target::Nats => args.nats_urls.clone(),
        };
        eprintln!("--- {label}: {target:?} ---");
        let cpu_before = clock::generator_cpu_secs();
        let figures = run_one(&args.scenario, target, urls)
            .await
            .map(|figures| Figures {
                generator_cpu_secs: clock::generator_cpu_secs() - cpu_before,
                ..figures
            })
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &figures {
            eprintln!("{label}: {target:?} run failed: {e}");
        }
        match target {
            Target::Herald => herald = figures,
            Target::Nats => nats = figures,
        }
    }
    let ratios = match (&herald, &nats) {
        (Ok(h), Ok(n)) => Some(Ratios {
            deliveries_per_sec: ratio(h.deliveries_per_sec, n.deliveries_per_sec),
            p50: ratio(h.p50_ns as f64, n.p50_ns as f64),
            p99: ratio(h.p99_ns as f64, n.p99_ns as f64),
            p999: ratio(h.p999_ns as f64, n.p999_ns as f64),
        }),
        _ => None,
    };
    let comparison = Comparison {
        label,
        herald,
        nats,
        ratios,
    };
    print_comparison(&comparison);
    if args.json {
        println!("COMPARE {}", serde_json::to_string(&comparison)?);
    }
    Ok(())
}

async fn run_one(scenario: &Scenario, target: Target, urls: Vec<String>) -> Result<Figures> {
    match scenario {
        Scenario::Fanout(args) => {
            let mut args = args.clone();
            args.load.target = target;
            args.url = urls;
            let s = fanout::run(args).await?;
            let t = &s.tally;
            Ok(Figures {
                deliveries_per_sec: s.deliveries_per_sec,
                expected: t.expected * s.subscribed as u64,
                received: t.received,
                p50_ns: s.latency.p50_ns,
                p99_ns: s.latency.p99_ns,
                p999_ns: s.latency.p999_ns,
                max_ns: s.latency.max_ns,
                subscribers: s.subscribers,
                subscribed: s.subscribed,
                lost: t.lost,
                duplicates: t.duplicates,
                out_of_order: t.out_of_order,
                disconnected: t.disconnected,
                publish_errors: s.publish.server_errors,
                generator_cpu_secs: 0.0,
            })
        }
        Scenario::Topics(args) => {
            let mut args = args.clone();
            args.load.target = target;
            args.url = urls;
            let s = topics::run(args).await?;
            let t = &s.tally;
            Ok(Figures {
                deliveries_per_sec: s.deliveries_per_sec,
                expected: s.expected_deliveries,
                received: t.received,
                p50_ns: s.latency.p50_ns,
                p99_ns: s.latency.p99_ns,
                p999_ns: s.latency.p999_ns,
                max_ns: s.latency.max_ns,
                subscribers: s.subscribers,
                subscribed: s.subscribed,
                lost: t.lost,
                duplicates: t.duplicates,
                out_of_order: t.out_of_order,
                disconnected: t.disconnected,
                publish_errors: s.publish.server_errors,
                generator_cpu_secs: 0.0,
            })
        }
    }
}

fn ratio(herald: f64, nats: f64) -> Option<f64> {
    (nats > 0.0 && herald.is_finite()).then(|| herald / nats)
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_string(), |r| format!("{r:.2}"))
}

/// Formats one figure of a run.
type Getter<'a> = &'a dyn Fn(&Figures) -> String;

fn print_comparison(c: &Comparison) {
    let cell = |f: &Result<Figures, String>, get: &dyn Fn(&Figures) -> String| match f {
        Ok(f) => get(f),
        Err(_) => "failed".to_string(),
    };
    let r = c.ratios.as_ref();
    println!("== compare {}: herald vs nats", c.label);
    println!(
        "{:<16} {:>16} {:>16} {:>12}",
        "", "herald", "nats", "herald/nats"
    );
    let rows: [(&str, Getter<'_>, Option<f64>); 5] = [
        (
            "deliveries/s",
            &|f| format!("{:.0}", f.deliveries_per_sec),
            r.and_then(|r| r.deliveries_per_sec),
        ),
        ("p50", &|f| fmt_ns(f.p50_ns), r.and_then(|r| r.p50)),
        ("p99", &|f| fmt_ns(f.p99_ns), r.and_then(|r| r.p99)),
        ("p99.9", &|f| fmt_ns(f.p999_ns), r.and_then(|r| r.p999)),
        ("max", &|f| fmt_ns(f.max_ns), None),
    ];
    for (name, get, ratio) in rows {
        println!(
            "{:<16} {:>16} {:>16} {:>12}",
            name,
            cell(&c.herald, get),
            cell(&c.nats, get),
            fmt_ratio(ratio)
        );
    }
    let integrity = |f: &Figures| {
        let unsubscribed = if f.subscribed < f.subscribers {
            format!(" ({} not subscribed)", f.subscribers - f.subscribed)
        } else {
            String::new()
        };
        format!(
            "{}/{}/{}{unsubscribed}",
            f.lost, f.duplicates, f.out_of_order
        )
    };
    println!(
        "{:<16} {:>16} {:>16}",
        "lost/dup/ooo",
        cell(&c.herald, &integrity),
        cell(&c.nats, &integrity)
    );
    println!(
        "{:<16} {:>16} {:>16}",
        "generator CPU s",
        cell(&c.herald, &|f| format!("{:.2}", f.generator_cpu_secs)),
        cell(&c.nats, &|f| format!("{:.2}", f.generator_cpu_secs))
    );
    println!(
        "{:<16} {:>16} {:>16}",
        "received",
        cell(&c.herald, &|f| format!("{}/{}", f.received, f.expected)),
        cell(&c.nats, &|f| format!("{}/{}", f.received, f.expected))
    );
    for (name, f) in [("herald", &c.herald), ("nats", &c.nats)] {
        if let Err(e) = f {
            println!("{name} failed: {e}");
        }
    }
    // One Markdown table row:
    // | scenario | herald del/s | nats del/s | ratio | herald p50 | nats p50 | ratio | herald p99 | nats p99 | ratio | herald lost/dup/ooo | nats lost/dup/ooo |
    println!(
        "ROW | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        c.label,
        cell(&c.herald, &|f| format!("{:.0}", f.deliveries_per_sec)),
        cell(&c.nats, &|f| format!("{:.0}", f.deliveries_per_sec)),
        fmt_ratio(r.and_then(|r| r.deliveries_per_sec)),
        cell(&c.herald, &|f| fmt_ns(f.p50_ns)),
        cell(&c.nats, &|f| fmt_ns(f.p50_ns)),
        fmt_ratio(r.and_then(|r| r.p50)),
        cell(&c.herald, &|f| fmt_ns(f.p99_ns)),
        cell(&c.nats, &|f| fmt_ns(f.p99_ns)),
        fmt_ratio(r.and_then(|r| r.p99)),
        cell(&c.herald, &integrity),
        cell(&c.nats, &integrity),
    );
    // The load generator's CPU seconds, for the scripts' CPU table.
    println!(
        "GENERATOR_CPU | {} | {} |",
        cell(&c.herald, &|f| format!("{:.2}", f.generator_cpu_secs)),
        cell(&c.nats, &|f| format!("{:.2}", f.generator_cpu_secs)),
    );
}
