//! `orderfleet-worker`: the daemon. Parses arguments and hands over to the library.

use clap::Parser;
use orderfleet::worker::{self, WorkerCli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = WorkerCli::parse();
    worker::init_logging(cli.worker.common.log_format);
    match worker::run(cli.worker).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "worker failed");
            eprintln!("orderfleet-worker: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
