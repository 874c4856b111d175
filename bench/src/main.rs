//! `herald-bench`: load generator for Herald, and for NATS over WebSocket as
//! a reference.
//!
//! - `fanout`: S subscribers on one topic, one publisher; deliveries per
//!   second, latency percentiles, loss, duplicates and order.
//! - `idle`: C quiet subscribed connections; the broker's memory per
//!   connection.
//!
//! Load is split over child processes (this binary re-executed as
//! `herald-bench worker`), because of the per-process file limit and to use
//! every core. Only loopback addresses are ever connected to.

mod clock;
mod fanout;
mod group;
mod herald;
mod idle;
mod nats;
mod payload;
mod publisher;
mod session;
mod stats;
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
    /// Idle connections: the broker's memory per subscribed connection.
    Idle(idle::IdleArgs),
    /// Internal: a child process started by `fanout` or `idle`.
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
        Command::Idle(args) => runtime(1)?.block_on(async {
            idle::run(args).await?;
            Ok(())
        }),
        Command::Worker { threads, spec } => {
            let spec: WorkerSpec = serde_json::from_str(&spec).context("bad --spec")?;
            runtime(threads)?.block_on(async {
                let mut link = ParentLink::new();
                match spec {
                    WorkerSpec::Fanout(spec) => group::run(spec, &mut link).await,
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
