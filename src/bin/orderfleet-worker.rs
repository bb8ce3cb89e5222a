//! `orderfleet-worker`: the daemon. Parses arguments and hands over to the library.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "orderfleet-worker",
    version,
    about = "Runs orderfleet queue handlers"
)]
struct Cli {
    #[command(flatten)]
    worker: orderfleet::worker::WorkerArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    orderfleet::worker::init_logging(cli.worker.common.log_format);
    match orderfleet::worker::run(cli.worker).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "worker failed");
            eprintln!("orderfleet-worker: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
