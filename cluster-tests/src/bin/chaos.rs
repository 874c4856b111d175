//! The chaos harness as a command (docs/chaos.md):
//!
//! ```sh
//! cargo run -p cluster-tests --bin chaos -- --seed 42 --duration 10m
//! ```
//!
//! Exit status: 0 when no rule was broken, 1 on any violation, 2 when the
//! harness itself failed (no Docker, an image that would not build, ...).

#[path = "../chaos/mod.rs"]
mod chaos;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use chaos::{BuildPolicy, Config, FaultKind};

/// Runs a Herald cluster in containers, injects faults while publishers and
/// subscribers run through a load balancer, and checks what they saw.
#[derive(Debug, Parser)]
#[command(name = "chaos")]
struct Args {
    /// Seed of the fault plan (and of the publishers' choice of topics).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Time budget of the fault phase (every kind still runs once).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Fault kinds to draw from, comma-separated: kill, pause, partition,
    /// rolling-restart.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,pause,partition,rolling-restart"
    )]
    faults: Vec<String>,
    #[arg(long, default_value_t = 3)]
    publishers: usize,
    #[arg(long, default_value_t = 3)]
    subscribers: usize,
    /// Subscribers that also leave and resume every few seconds.
    #[arg(long, default_value_t = 1)]
    flappers: usize,
    #[arg(long, default_value_t = 12)]
    topics: usize,
    /// Pause between one publisher's publishes.
    #[arg(long, default_value = "30ms", value_parser = humantime::parse_duration)]
    publish_interval: Duration,
    /// Bound on membership convergence after each heal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    converge_bound: Duration,
    /// When to build images with scripts/compose-build.sh: `stale` (missing,
    /// or the herald image older than its sources), `missing`, or `never`.
    #[arg(long, default_value = "stale")]
    build: String,
    /// Where to write node logs and the report (default target/chaos).
    #[arg(long)]
    artifacts: Option<PathBuf>,
    /// Run this herald image as it is (implies `--build never`).
    #[arg(long)]
    image: Option<String>,
}

fn fault_kind(name: &str) -> Option<FaultKind> {
    FaultKind::ALL.into_iter().find(|k| k.name() == name.trim())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut faults = Vec::new();
    for name in &args.faults {
        match fault_kind(name) {
            Some(kind) if !faults.contains(&kind) => faults.push(kind),
            Some(_) => {}
            None => {
                eprintln!(
                    "chaos: unknown fault {name:?} (kill, pause, partition, rolling-restart)"
                );
                return ExitCode::from(2);
            }
        }
    }
    if faults.is_empty() {
        eprintln!("chaos: no faults to inject");
        return ExitCode::from(2);
    }
    if let Err(why) = chaos::docker_available() {
        eprintln!("chaos: Docker is not available: {why}");
        return ExitCode::from(2);
    }
    let mut config = Config::new(args.seed, args.duration);
    config.faults = faults;
    config.publishers = args.publishers;
    config.subscribers = args.subscribers;
    config.flappers = args.flappers;
    config.topics = args.topics.max(1);
    config.publish_interval = args.publish_interval;
    config.converge_bound = args.converge_bound;
    match BuildPolicy::parse(&args.build) {
        Some(policy) => config.build = policy,
        None => {
            eprintln!(
                "chaos: --build takes never, missing or stale, not {:?}",
                args.build
            );
            return ExitCode::from(2);
        }
    }
    if let Some(image) = args.image {
        config.herald_image = image;
        config.build = BuildPolicy::Never;
    }
    if let Some(dir) = args.artifacts {
        config.artifacts = dir;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = chaos::run(config) => Some(outcome),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    // Dropping the run on Ctrl-C removes its containers and network.
    match outcome {
        None => {
            eprintln!("chaos: interrupted; containers and network removed");
            ExitCode::from(2)
        }
        Some(Err(e)) => {
            eprintln!("chaos: the harness failed: {e:#}");
            ExitCode::from(2)
        }
        Some(Ok(outcome)) => {
            println!("{}", outcome.report);
            if !outcome.harness_errors.is_empty() {
                eprintln!(
                    "chaos: run {}: the harness's own docker commands failed: {}",
                    outcome.run,
                    outcome.harness_errors.join("; ")
                );
                ExitCode::from(2)
            } else if outcome.passed() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "chaos: run {} found {} violation(s); logs and report in {}",
                    outcome.run,
                    outcome.violations.len(),
                    outcome.artifacts.display()
                );
                ExitCode::from(1)
            }
        }
    }
}
