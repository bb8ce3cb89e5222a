//! `orderfleet-bench`: runs the runtime benchmark ([`orderfleet_bench::consumer`]), then the
//! saga benchmark ([`orderfleet_bench::saga`]), and prints their figures. The last line is a
//! one-line JSON summary of both.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use orderfleet::runtime::group::GroupConfig;
use orderfleet::telemetry::logging::{init_logging, LogFormat};
use orderfleet_bench::consumer::{self as bench, BenchConfig};
use orderfleet_bench::saga::{self as bench_saga, SagaConfig};

// The same allocator as the fleet's binaries, so the figures are theirs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks the consumer runtime against the in-memory SQS endpoint, then the order saga in
/// process on real PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "orderfleet-bench", version)]
pub struct Args {
    /// Log format (logs go to stderr).
    #[arg(
        long,
        env = "ORDERFLEET_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    pub log_format: LogFormat,
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
    /// Orders driven through the whole saga in the saga phase (0 skips it).
    #[arg(long, default_value_t = 4000)]
    pub saga_orders: usize,
    /// Concurrent delivery tasks of the saga phase. The saga phase's defaults are the settings
    /// of a busy fleet (many events in flight, large groups); `--saga-group-max 64
    /// --saga-group-transactions 1` uses the worker's ceilings (`--group-commit-max`,
    /// `--group-commit-transactions`).
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub saga_workers: usize,
    /// Events each saga task takes from the outbox at once.
    #[arg(long, default_value_t = 512, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub saga_batch: usize,
    /// Most events of one handler committed in one transaction in the saga phase (1: each
    /// alone, as before group commit).
    #[arg(long, default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub saga_group_max: usize,
    /// Transactions of one handler running at once in the saga phase.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub saga_group_transactions: usize,
    /// Keep the saga phase's scratch database instead of dropping it.
    #[arg(long)]
    pub saga_keep_database: bool,
    /// Run only the saga phase.
    #[arg(long, conflicts_with = "runtime_only")]
    pub saga_only: bool,
    /// Run only the runtime phase.
    #[arg(long)]
    pub runtime_only: bool,
    /// PostgreSQL for the saga phase (a scratch database is created next to this one).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("orderfleet-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    let mut summary = serde_json::Map::new();
    if !args.saga_only {
        runtime_phase(&args, &mut summary).await?;
    }
    if !args.runtime_only && args.saga_orders > 0 {
        saga_phase(&args, &mut summary).await?;
    }
    println!("{}", serde_json::Value::Object(summary));
    Ok(ExitCode::SUCCESS)
}

fn round(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

async fn runtime_phase(
    args: &Args,
    summary: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
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
    summary.insert("msgs_per_sec".into(), r.msgs_per_sec.round().into());
    summary.insert(
        "sqs_requests_per_msg".into(),
        round(r.sqs_requests_per_msg, 3).into(),
    );
    summary.insert("rss_mb".into(), round(r.rss_mb, 1).into());
    summary.insert(
        "p99_visible_to_start_ms".into(),
        round(r.p99_visible_to_start_ms, 2).into(),
    );
    Ok(())
}

async fn saga_phase(
    args: &Args,
    summary: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let Some(database_url) = args.database_url.clone() else {
        anyhow::bail!(
            "the saga phase needs PostgreSQL: set DATABASE_URL (`eval \"$(make -s env)\"`), \
             or pass --runtime-only"
        );
    };
    let cfg = SagaConfig {
        database_url,
        orders: args.saga_orders,
        workers: args.saga_workers,
        batch: args.saga_batch,
        group: GroupConfig {
            max_group: args.saga_group_max,
            transactions: args.saga_group_transactions,
            ..GroupConfig::default()
        },
        keep_database: args.saga_keep_database,
    };
    println!(
        "saga benchmark: {} orders through orders, inventory, payments and fulfillment in \
         process, real PostgreSQL, sandbox payments without latency",
        cfg.orders
    );
    println!(
        "saga group commit: up to {} events per transaction, {} transactions per handler at once",
        cfg.group.max_group, cfg.group.transactions
    );
    let r = bench_saga::run(&cfg, |line| println!("{line}")).await?;
    println!(
        "complete orders per second: {:.0}  ({} orders in {:.2}s)",
        r.orders_per_sec, r.completed, r.elapsed_secs
    );
    println!(
        "per order:                  {:.1} events, {:.1} handler deliveries in {:.1} handler transactions, {:.1} database transactions",
        r.events_per_order,
        r.handler_deliveries_per_order,
        r.handler_transactions_per_order,
        r.db_transactions_per_order
    );
    summary.insert("saga_orders".into(), r.orders.into());
    summary.insert(
        "saga_settings".into(),
        serde_json::json!({
            "workers": cfg.workers,
            "batch": cfg.batch,
            "group_max": cfg.group.max_group,
            "group_transactions": cfg.group.transactions,
        }),
    );
    summary.insert(
        "saga_orders_per_sec".into(),
        r.orders_per_sec.round().into(),
    );
    summary.insert(
        "handler_transactions_per_order".into(),
        round(r.handler_transactions_per_order, 2).into(),
    );
    summary.insert(
        "db_transactions_per_order".into(),
        round(r.db_transactions_per_order, 2).into(),
    );
    Ok(())
}
