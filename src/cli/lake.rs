//! `orderfleet lake stats [--json]`: reads the data lake back from S3 and counts its records by
//! detail-type and by day. See [`crate::store::lake`] for the layout and what `duplicates` means.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::PrefixArg;
use crate::infra::aws;
use crate::infra::topology::Topology;
use crate::store::lake::{self, LakeStats};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: LakeCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum LakeCommand {
    /// Count the lake's records by detail-type and day, read back from S3.
    Stats(StatsArgs),
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub prefix: PrefixArg,
    /// The lake bucket; default: the bucket the delivery stream `<prefix>-lake` writes to.
    #[arg(long, env = "ORDERFLEET_LAKE_BUCKET")]
    pub lake_bucket: Option<String>,
    /// Print the counts as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        LakeCommand::Stats(args) => stats(args).await,
    }
}

async fn stats(args: StatsArgs) -> Result<ExitCode> {
    let clients = aws::Clients::from_env().await;
    let topo = Topology::with_prefix(&args.prefix.prefix);
    let bucket = match args.lake_bucket.filter(|b| !b.is_empty()) {
        Some(bucket) => bucket,
        None => lake::resolve_bucket(&clients.firehose, &topo.firehose_stream()).await?,
    };
    let stats = LakeStats::gather(&clients.s3, &bucket).await?;
    if args.json {
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "lake s3://{}: {} object(s), {} record(s), {} distinct event(s), {} duplicate(s), {} unreadable line(s)",
        stats.bucket,
        stats.objects,
        stats.records,
        stats.distinct_events,
        stats.duplicates,
        stats.unreadable
    );
    println!();
    println!("{:<32} {:>10}", "DETAIL-TYPE", "EVENTS");
    for (detail_type, n) in &stats.by_detail_type {
        println!("{detail_type:<32} {n:>10}");
    }
    println!();
    println!("{:<32} {:>10}", "DAY (EVENT TIME, UTC)", "EVENTS");
    for (day, n) in &stats.by_day {
        println!("{day:<32} {n:>10}");
    }
    println!();
    println!("{:<32} {:>10}", "PARTITION (KEY)", "RECORDS");
    for (day, n) in &stats.by_partition {
        println!("{day:<32} {n:>10}");
    }
    Ok(ExitCode::SUCCESS)
}
