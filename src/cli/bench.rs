//! `orderfleet bench`: runs the runtime benchmark and prints its figures. The last line is a
//! one-line JSON summary.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bench::{self, BenchConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Messages preloaded and drained in the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,
    /// Consumer concurrency.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Receive loops.
    #[arg(long, default_value_t = 8)]
    pub receivers: usize,
    /// Messages sent one by one in the latency phase.
    #[arg(long, default_value_t = 1000)]
    pub latency_messages: usize,
    /// Pause between latency-phase messages.
    #[arg(long, default_value_t = 5)]
    pub latency_interval_ms: u64,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the orderfleet binary")?;
    let dir = exe.parent().context("binary directory")?;
    let cfg = BenchConfig {
        messages: args.messages,
        concurrency: args.concurrency,
        receivers: args.receivers,
        latency_messages: args.latency_messages,
        latency_interval: Duration::from_millis(args.latency_interval_ms),
    };
    println!(
        "runtime benchmark: {} messages, concurrency {}, {} receive loops, no-op handler",
        cfg.messages, cfg.concurrency, cfg.receivers
    );
    let r = bench::run(dir, &cfg, |line| println!("{line}")).await?;
    println!("messages per second:        {:.0}", r.msgs_per_sec);
    println!(
        "SQS requests per message:   {:.3}  ({})",
        r.sqs_requests_per_msg, r.requests_by_operation
    );
    println!("peak RSS:                   {:.1} MB", r.rss_mb);
    println!(
        "visible -> handler start:   p50 {:.2} ms, p99 {:.2} ms ({} messages, one every {} ms)",
        r.p50_visible_to_start_ms,
        r.p99_visible_to_start_ms,
        cfg.latency_messages,
        args.latency_interval_ms
    );
    println!(
        "{}",
        serde_json::json!({
            "msgs_per_sec": r.msgs_per_sec.round(),
            "sqs_requests_per_msg": (r.sqs_requests_per_msg * 1000.0).round() / 1000.0,
            "rss_mb": (r.rss_mb * 10.0).round() / 10.0,
            "p99_visible_to_start_ms": (r.p99_visible_to_start_ms * 100.0).round() / 100.0,
        })
    );
    Ok(ExitCode::SUCCESS)
}
