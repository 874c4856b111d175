//! The `herald` binary: parses the configuration, starts the runtime and
//! runs the node until it is told to stop.

use std::process::ExitCode;

use clap::Parser;
use node::config::{Cli, Command, Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None | Some(Command::Run) | Some(Command::Doctor) => {}
        Some(Command::Healthcheck { url, timeout }) => {
            let url = url.unwrap_or_else(|| {
                node::healthcheck::default_url(std::env::var("HERALD_ADMIN_LISTEN").ok().as_deref())
            });
            return match node::healthcheck::run(&url, timeout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald healthcheck: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Cert(command)) => {
            return match node::cert::run(&command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald cert: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    let config = match Config::load(&cli.settings) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Some(Command::Doctor)) {
        return if node::doctor::run(&config) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    // Span export (when configured) is flushed after the runtime is gone.
    let telemetry = node::telemetry::init(config.log.format, &config.node.id);
    let result = run(config);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "herald stopped with an error");
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("herald-worker");
    if let Some(threads) = config.node.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.build()?;
    runtime.block_on(node::run(config))?;
    // Tasks still parked on sockets are dropped with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
