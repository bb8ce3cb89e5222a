//! `orderfleet dlq import QUEUE --from FILE`: replay an export into a queue, body and attributes
//! byte for byte; rerunning after a crash continues where it stopped (journal next to FILE).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::{audit, verdict};
use crate::cli::PrefixArg;
use crate::infra::aws::Clients;
use crate::operator::export::{self, ImportOptions};
use crate::operator::progress::Progress;
use crate::operator::queue;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Handler name (its DLQ), queue name or queue URL to send to.
    pub queue: String,
    /// A file written by `orderfleet dlq export`.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// Messages sent per second at most.
    #[arg(long, value_name = "PER_SEC")]
    pub rate: Option<f64>,
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
    let stop = super::stop_on_ctrl_c();
    let mut progress = Progress::stderr(format!("importing into {}", q.name), None);
    let opts = ImportOptions {
        rate: args.rate.filter(|r| *r > 0.0),
        crash_after_send: None,
    };
    let report = export::import(&clients.sqs, &q, &args.from, &opts, &stop, &mut progress).await?;
    let mut extra = String::new();
    if report.already_sent > 0 {
        extra.push_str(&format!(", {} sent by an earlier run", report.already_sent));
    }
    if report.in_doubt_resent > 0 {
        extra.push_str(&format!(", {} in doubt sent again", report.in_doubt_resent));
    }
    audit(
        "import",
        &format!(
            "imported {} of {} lines from {} into {}, {} failed{extra}{}, journal {}",
            report.sent + report.in_doubt_resent,
            report.lines,
            args.from.display(),
            q.name,
            report.failed,
            if report.interrupted {
                ", interrupted (rerun to continue)"
            } else {
                ""
            },
            report.journal.display()
        ),
    );
    for e in &report.errors {
        eprintln!("import: failed: {e}");
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    }
    Ok(verdict(report.interrupted, report.failed))
}
