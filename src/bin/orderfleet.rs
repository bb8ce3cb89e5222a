//! `orderfleet`: the operator CLI. Parses arguments and hands over to the library.

use clap::Parser;

// mimalloc rather than glibc's malloc: the saga benchmark spends a fifth of the process's CPU in
// allocation, and ran about 10% faster with it (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = orderfleet::cli::Cli::parse();
    orderfleet::telemetry::logging::init_logging(cli.log_format);
    match orderfleet::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("orderfleet: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
