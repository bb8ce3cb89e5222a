//! `orderfleet dlq`: inspect, redrive, export, import and purge dead-letter queues. One file
//! per subcommand; the work happens in [`crate::operator`].
//!
//! QUEUE is a handler name (`orders` means `<prefix>-orders-dlq`), a queue name, or a queue
//! URL. Exit codes: 0 done, 1 done with failures (the audit line says which), 2 refused or
//! failed to start, 130 stopped by Ctrl-C (between batches; rerunning continues).

pub mod cancel;
pub mod export;
pub mod import;
pub mod peek;
pub mod purge;
pub mod redrive;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use crate::operator::filter::Filter;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead-lettered messages and why they failed, without consuming them.
    Peek(peek::Args),
    /// Move messages back to their work queue (or --to another), all or only those matching.
    Redrive(redrive::Args),
    /// Cancel the running native move task of a DLQ.
    Cancel(cancel::Args),
    /// Write messages to a JSON-lines file (mode 0600); they stay unless --delete.
    Export(export::Args),
    /// Replay an exported file into a queue; resumable.
    Import(import::Args),
    /// Delete every message of a queue, for good (needs --yes).
    Purge(purge::Args),
}

pub async fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        DlqCommand::Peek(a) => peek::run(a).await,
        DlqCommand::Redrive(a) => redrive::run(a).await,
        DlqCommand::Cancel(a) => cancel::run(a).await,
        DlqCommand::Export(a) => export::run(a).await,
        DlqCommand::Import(a) => import::run(a).await,
        DlqCommand::Purge(a) => purge::run(a).await,
    }
}

/// `--filter`, shared by the commands that select messages.
#[derive(Debug, Clone, clap::Args)]
pub struct FilterArgs {
    /// Only messages matching EXPR (repeat: all must match): KEY=VALUE, KEY!=VALUE,
    /// KEY~SUBSTRING, KEY>N, KEY<N with KEY one of detail-type, source, kind, reason,
    /// receive_count, age (e.g. age>2h), detail.<path> (e.g. detail.order_id=o-123).
    #[arg(long = "filter", value_name = "EXPR", value_parser = parse_filter)]
    pub filters: Vec<Filter>,
}

fn parse_filter(s: &str) -> Result<Filter, String> {
    s.parse()
}

/// `--visibility-timeout-secs`, shared by the commands that read a queue.
#[derive(Debug, Clone, clap::Args)]
pub struct VisibilityArg {
    /// How long messages read stay hidden from others while the command runs; they are made
    /// visible again at the end (or deleted once moved).
    #[arg(long, env = "ORDERFLEET_DLQ_VISIBILITY_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(2..=43_200))]
    pub visibility_timeout_secs: u64,
}

impl VisibilityArg {
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.visibility_timeout_secs)
    }
}

/// Ends a run that changed something: one line on stderr, and the same as a tracing event
/// (so that it reaches the logs when the CLI runs as a job).
pub(crate) fn audit(action: &str, line: &str) {
    eprintln!("audit: {line}");
    tracing::info!(target: "orderfleet::audit", action, "{line}");
}

/// A token cancelled by the first Ctrl-C: commands stop between batches. A second Ctrl-C
/// quits at once, which the journals make as safe as a crash.
pub(crate) fn stop_on_ctrl_c() -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        eprintln!("stopping after the current batch (Ctrl-C again to quit at once)");
        token.cancel();
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    stop
}

/// The exit code of a run: interrupted, with failures, or clean.
pub(crate) fn verdict(interrupted: bool, failures: u64) -> ExitCode {
    if interrupted {
        ExitCode::from(130)
    } else if failures > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// A table cell: `-` for nothing, cut to `width` characters.
pub(crate) fn cell(text: Option<&str>, width: usize) -> String {
    let t = text.unwrap_or("-");
    if t.chars().count() > width {
        let cut: String = t.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        t.to_string()
    }
}
