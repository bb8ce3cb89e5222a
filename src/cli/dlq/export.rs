//! `orderfleet dlq export QUEUE --out FILE`: messages to JSON lines, full fidelity, mode 0600.
//! Bodies are kept whole, customer data and payment tokens included: the file is as private
//! as the queue, and is created 0600.
//! See [`crate::operator::export`] for the format.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::{audit, verdict, FilterArgs, VisibilityArg};
use crate::cli::PrefixArg;
use crate::infra::aws::Clients;
use crate::operator::export::{self, ExportOptions};
use crate::operator::progress::Progress;
use crate::operator::queue;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Handler name (its DLQ), queue name or queue URL.
    pub queue: String,
    /// File to create (never overwritten), mode 0600. It holds the bodies unmasked, customer
    /// data and payment tokens as the producer sent them: keep it as private as the queue.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Delete each message from the queue once its line is safely on disk.
    #[arg(long)]
    pub delete: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Export at most N messages.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    #[command(flatten)]
    pub visibility: VisibilityArg,
    #[command(flatten)]
    pub prefix: PrefixArg,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let clients = Clients::from_env().await;
    let q = queue::resolve(
        &clients.sqs,
        &args.prefix.prefix,
        &args.queue,
        queue::Role::Dlq,
    )
    .await?;
    let total = queue::counts(&clients.sqs, &q.url)
        .await
        .ok()
        .map(|c| c.visible);
    let opts = ExportOptions {
        filters: args.filter.filters.clone(),
        limit: args.limit,
        delete: args.delete,
        visibility: args.visibility.duration(),
    };
    let stop = super::stop_on_ctrl_c();
    let mut progress = Progress::stderr(format!("exporting {}", q.name), total);
    let report = export::export(&clients.sqs, &q, &args.out, &opts, &stop, &mut progress).await?;
    let kept = if args.delete {
        format!(
            "deleted {} from the queue, {} delete(s) failed",
            report.deleted, report.delete_failures
        )
    } else {
        "the messages stay in the queue".to_string()
    };
    audit(
        "export",
        &format!(
            "exported {} of {} examined from {} to {} ({kept}){}",
            report.exported,
            report.examined,
            q.name,
            args.out.display(),
            if report.interrupted {
                ", interrupted"
            } else {
                ""
            }
        ),
    );
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    }
    Ok(verdict(report.interrupted, report.delete_failures))
}
