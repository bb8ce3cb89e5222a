//! `orderfleet-bench-fleet`: complete orders per second through real `orderfleet-worker`
//! processes, the benchmark endpoint (SQS and EventBridge) and PostgreSQL, with what each order
//! costs ([`orderfleet_bench::fleet`]). The last line is a one-line JSON summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use orderfleet::domain::names::HandlerName;
use orderfleet_bench::fleet::{self, FleetConfig};

/// Runs the fleet benchmark: a throughput phase, then a latency phase at a fixed rate.
#[derive(Debug, Parser)]
#[command(name = "orderfleet-bench-fleet", version)]
struct Args {
    /// Orders put through the fleet first, unmeasured; then the tables are analysed, as
    /// autovacuum would have done in a shop's database.
    #[arg(long, default_value_t = 1000)]
    warmup_orders: usize,
    /// Orders of the throughput phase, put on the bus as fast as PutEvents takes them.
    #[arg(long, default_value_t = 3000)]
    orders: usize,
    /// Orders of the latency phase (0 skips it).
    #[arg(long, default_value_t = 1000)]
    latency_orders: usize,
    /// Orders per second offered in the latency phase; default: half the throughput phase's
    /// complete orders per second.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// The handlers of one worker process, comma-separated; repeat for each process. Default:
    /// one process per saga handler (orders, inventory, payments, fulfillment) and one for
    /// the rest.
    #[arg(long = "process", value_name = "HANDLERS")]
    processes: Vec<String>,
    /// Extra environment for every worker, `NAME=VALUE`; repeatable (e.g.
    /// `--worker-env ORDERFLEET_CONCURRENCY=32` to compare settings).
    #[arg(long = "worker-env", value_name = "NAME=VALUE")]
    worker_env: Vec<String>,
    /// Resource prefix of the benchmark's queues, bus and lake stream.
    #[arg(long, default_value = "ofbench")]
    prefix: String,
    /// Where `orderfleet`, `orderfleet-worker` and `orderfleet-bench-sqs` are; default: next
    /// to this binary.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Longest a phase may take.
    #[arg(long, default_value_t = 600)]
    phase_timeout_secs: u64,
    /// The process serving S3 and Firehose (the lake's emulator), whose CPU time is reported
    /// apart from the endpoint's.
    #[arg(long)]
    lake_emulator_pid: Option<u32>,
    /// Keep the scratch database for inspection.
    #[arg(long)]
    keep_database: bool,
    /// Write each worker's output (its JSON log and EMF lines) to a file in this directory,
    /// `worker-<i>-<handlers>.log`, for a look at where the time goes.
    #[arg(long, value_name = "DIR")]
    worker_logs: Option<std::path::PathBuf>,
    /// Every PutEvents (the relays', the hand-offs' and the driver's) waits this long at the
    /// endpoint before it is served: a real region's round trip, which loopback does not have.
    /// Shown in the summary when set.
    #[arg(long, default_value_t = 0)]
    put_events_delay_ms: u64,
    /// Where the run's scratch directory goes: the workers' health files and the emails they
    /// write as files (about 10,000 a run). Default: the system's temporary directory.
    /// `scripts/bench-fleet.sh` passes /dev/shm when it has room (see that script).
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<std::path::PathBuf>,
    /// Products in the catalogue, as `orderfleet seed --skus` (2 to 10,000); orders draw
    /// their lines from all of them, so fewer SKUs means hotter stock rows.
    #[arg(long, default_value_t = orderfleet::cli::simulator::DEFAULT_SKUS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=10_000))]
    skus: usize,
    /// PostgreSQL admin connection; the scratch database is created next to it.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

fn split(processes: &[String]) -> Result<Vec<Vec<HandlerName>>> {
    if processes.is_empty() {
        return Ok(fleet::default_split());
    }
    let mut split = Vec::new();
    let mut seen = Vec::new();
    for p in processes {
        let mut handlers = Vec::new();
        for name in p.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let h: HandlerName = name.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            if seen.contains(&h) {
                bail!("handler {h} is in more than one --process");
            }
            seen.push(h);
            handlers.push(h);
        }
        if handlers.is_empty() {
            bail!("an empty --process");
        }
        split.push(handlers);
    }
    for h in fleet::SAGA {
        if !seen.contains(&h) {
            bail!("no --process runs {h}; every saga handler must run for orders to complete");
        }
    }
    Ok(split)
}

#[tokio::main]
async fn main() -> ExitCode {
    // On SIGINT or SIGTERM the run is dropped, and with it every process it started.
    let result = tokio::select! {
        r = run() => r,
        _ = stop_signal() => Err(anyhow::anyhow!("stopped by a signal")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orderfleet-bench-fleet: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run() -> Result<()> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()
            .context("locating this binary")?
            .parent()
            .context("this binary's directory")?
            .to_path_buf(),
    };
    for bin in ["orderfleet", "orderfleet-worker", "orderfleet-bench-sqs"] {
        if !bin_dir.join(bin).is_file() {
            bail!(
                "{} not found; build the fleet and the benchmarks first (`make bench-fleet` does)",
                bin_dir.join(bin).display()
            );
        }
    }
    let worker_env = args
        .worker_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--worker-env {kv:?} is not NAME=VALUE"))
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = FleetConfig {
        database_url: args.database_url,
        bin_dir,
        warmup_orders: args.warmup_orders,
        orders: args.orders,
        latency_orders: args.latency_orders,
        latency_rate: args.latency_rate,
        split: split(&args.processes)?,
        worker_env,
        prefix: args.prefix,
        keep_database: args.keep_database,
        worker_logs: args.worker_logs,
        lake_emulator_pid: args.lake_emulator_pid,
        phase_timeout: Duration::from_secs(args.phase_timeout_secs),
        put_events_delay_ms: args.put_events_delay_ms,
        scratch_parent: args.scratch_dir,
        skus: args.skus,
    };
    let report = fleet::run(&cfg, |line| eprintln!("{line}")).await?;
    for phase in std::iter::once(&report.throughput).chain(report.latency.as_ref()) {
        println!(
            "{}",
            serde_json::to_string(phase).context("encoding a phase")?
        );
    }
    println!(
        "{}",
        serde_json::to_string(&report.workers).context("encoding the workers")?
    );
    println!("{}", report.summary());
    Ok(())
}
