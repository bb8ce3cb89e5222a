//! `orderfleet-bench-sqs`: runs the in-memory SQS and EventBridge benchmark
//! endpoint ([`orderfleet_bench::sqs`], [`orderfleet_bench::events`])
//! standalone, so that any SQS consumer can be pointed at it with
//! `--endpoint-url http://HOST:PORT`, and a whole fleet with
//! `AWS_ENDPOINT_URL_SQS=http://HOST:PORT` and
//! `AWS_ENDPOINT_URL_EVENTBRIDGE=http://HOST:PORT`.

use clap::Parser;
use orderfleet_bench::sqs::{serve, BenchSqs};

/// In-memory SQS (AWS JSON 1.0) and EventBridge (AWS JSON 1.1) endpoint for benchmarking
/// consumers and fleets.
#[derive(Debug, Parser)]
#[command(name = "orderfleet-bench-sqs", version)]
struct Args {
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "ORDERFLEET_BENCH_SQS_PORT", default_value_t = 9324)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Queue to create and fill before serving.
    #[arg(long, requires = "preload_count")]
    preload_queue: Option<String>,
    /// Number of messages to put in the preload queue.
    #[arg(long, requires = "preload_queue")]
    preload_count: Option<usize>,
    /// Body of each preloaded message; `{i}` is replaced by its index.
    #[arg(long, default_value = "{\"seq\":{i}}")]
    preload_body: String,
    /// Every PutEvents waits this long before it is served (and its events delivered): the
    /// network and service time of a real region, which loopback does not have.
    #[arg(long, default_value_t = 0)]
    put_events_delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = BenchSqs::new();
    state.set_put_events_delay(std::time::Duration::from_millis(args.put_events_delay_ms));
    if let (Some(queue), Some(count)) = (&args.preload_queue, args.preload_count) {
        let template = &args.preload_body;
        state.preload(
            queue,
            (0..count).map(|n| template.replace("{i}", &n.to_string())),
        );
        eprintln!("orderfleet-bench-sqs: preloaded {count} messages into {queue}");
    }
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
    eprintln!(
        "orderfleet-bench-sqs: listening on http://{}",
        listener.local_addr()?
    );
    serve(listener, state, shutdown_signal()).await
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    eprintln!("orderfleet-bench-sqs: shutting down");
}
