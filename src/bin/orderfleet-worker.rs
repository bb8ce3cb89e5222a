//! `orderfleet-worker`: the daemon. Parses arguments and hands over to the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use orderfleet::worker::{self, WorkerCli, WorkerCommand};

// mimalloc rather than glibc's malloc: the saga benchmark spends a fifth of the process's CPU in
// allocation, and ran about 10% faster with it (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = WorkerCli::parse();
    if let Some(WorkerCommand::Healthcheck {
        health_file,
        max_age_secs,
    }) = cli.command
    {
        return match orderfleet::worker::health::check(
            &health_file,
            Duration::from_secs(max_age_secs),
        ) {
            Ok(h) => {
                println!(
                    "healthy: pid {} handlers {} in flight {}",
                    h.pid,
                    h.handlers.join(","),
                    h.in_flight
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("unhealthy: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match worker::runtime(cli.worker.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("orderfleet-worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        orderfleet::telemetry::logging::init_logging(cli.worker.common.log_format);
        match worker::run(cli.worker).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "worker failed");
                eprintln!("orderfleet-worker: {e:#}");
                ExitCode::from(2)
            }
        }
    })
}
