//! `herald-bench`: load generator for Herald, and for NATS over WebSocket as
//! a reference.
//!
//! - `fanout`: S subscribers on one topic, one publisher; deliveries per
//!   second, latency percentiles, loss, duplicates and order.
//! - `topics`: T topics with K subscribers each, every message crossing
//!   nodes (subscribers of topic t on URL t % U, its publisher on URL
//!   (t + 1) % U); the same figures, with loss and order checked per topic.
//! - `compare`: one of those scenarios against Herald and NATS in one run,
//!   with the Herald/NATS ratios.
//! - `idle`: C quiet subscribed connections; the broker's memory per
//!   connection.
//!
//! Load is split over child processes (this binary re-executed as
//! `herald-bench worker`), because of the per-process file limit and to use
//! every core. Only loopback addresses are ever connected to.

mod clock;
mod compare;
mod fanout;
mod group;
mod herald;
mod idle;
mod load;
mod nats;
mod payload;
mod publisher;
mod session;
mod stats;
mod topics;
mod unrelated;
mod worker;
mod ws;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::worker::{ParentLink, WorkerSpec};

#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "Load generator for Herald (and NATS over WebSocket)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fan-out: S subscribers on one topic, one publisher sending N messages.
    Fanout(fanout::FanoutArgs),
    /// Topics: T topics, K subscribers each, every message crossing nodes.
    Topics(topics::TopicsArgs),
    /// Runs a scenario against Herald and NATS and prints Herald/NATS ratios.
    Compare(compare::CompareArgs),
    /// Idle connections: the broker's memory per subscribed connection.
    Idle(idle::IdleArgs),
    /// Internal: a child process started by another mode.
    #[command(hide = true)]
    Worker {
        /// Tokio worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// The job, as JSON.
        #[arg(long)]
        spec: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fanout(args) => runtime(2)?.block_on(async {
            fanout::run(args).await?;
            Ok(())
        }),
        Command::Topics(args) => runtime(2)?.block_on(async {
            topics::run(args).await?;
            Ok(())
        }),
        Command::Compare(args) => runtime(2)?.block_on(compare::run(args)),
        Command::Idle(args) => runtime(1)?.block_on(async {
            idle::run(args).await?;
            Ok(())
        }),
        Command::Worker { threads, spec } => {
            let spec: WorkerSpec = serde_json::from_str(&spec).context("bad --spec")?;
            runtime(threads)?.block_on(async {
                let mut link = ParentLink::new();
                match spec {
                    WorkerSpec::Group(spec) => group::run(spec, &mut link).await,
                    WorkerSpec::Idle(spec) => idle::run_group(spec, &mut link).await,
                }
            })
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
