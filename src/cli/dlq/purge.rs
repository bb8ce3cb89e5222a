//! `orderfleet dlq purge QUEUE --yes`: delete every message of a queue. Refuses without `--yes`.

use std::process::ExitCode;

use anyhow::Result;

use super::audit;
use crate::cli::PrefixArg;
use crate::domain::outcome::error_chain;
use crate::infra::aws::Clients;
use crate::operator::queue;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Handler name (its DLQ), queue name or queue URL.
    pub queue: String,
    /// Really delete every message, for good.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub prefix: PrefixArg,
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
    let depth = queue::counts(&clients.sqs, &q.url).await?;
    let count = depth.visible + depth.in_flight + depth.delayed;
    if !args.yes {
        eprintln!(
            "purge: refusing to delete the ~{count} message(s) of {} without --yes; a purge cannot be undone. \
             Keep a copy first: orderfleet dlq export {} --out FILE",
            q.name, args.queue
        );
        return Ok(ExitCode::from(2));
    }
    clients
        .sqs
        .purge_queue()
        .queue_url(&q.url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("purging {}: {}", q.name, error_chain(&e)))?;
    audit(
        "purge",
        &format!(
            "purged {} (~{count} message(s)); SQS finishes a purge within 60 s",
            q.name
        ),
    );
    Ok(ExitCode::SUCCESS)
}
