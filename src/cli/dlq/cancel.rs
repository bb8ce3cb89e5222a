//! `orderfleet dlq cancel QUEUE`: stop the native move task running out of a DLQ. (A
//! client-side redrive stops with Ctrl-C.)

use std::process::ExitCode;

use anyhow::Result;

use super::audit;
use crate::cli::PrefixArg;
use crate::infra::aws::Clients;
use crate::operator::native::{self, Native};
use crate::operator::queue;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Handler name (its DLQ), queue name or queue URL whose move task to cancel.
    pub queue: String,
    #[command(flatten)]
    pub prefix: PrefixArg,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let clients = Clients::from_env().await;
    let sqs = &clients.sqs;
    let source = queue::resolve(sqs, &args.prefix.prefix, &args.queue, queue::Role::Dlq).await?;
    let tasks = match native::list(sqs, &source.arn).await? {
        Native::Supported(tasks) => tasks,
        Native::Unsupported(why) => {
            eprintln!(
                "cancel: this endpoint has no message move tasks ({why}); a client-side redrive stops with Ctrl-C"
            );
            return Ok(ExitCode::from(2));
        }
    };
    let Some(handle) = tasks
        .iter()
        .find(|t| t.status == "RUNNING")
        .and_then(|t| t.handle.clone())
    else {
        eprintln!("cancel: no move task is running on {}", source.name);
        return Ok(ExitCode::from(1));
    };
    match native::cancel(sqs, &handle).await? {
        Native::Supported(moved) => {
            audit(
                "cancel",
                &format!(
                    "cancelled move task {handle} out of {} after {moved} moved",
                    source.name
                ),
            );
            Ok(ExitCode::SUCCESS)
        }
        Native::Unsupported(why) => {
            eprintln!("cancel: CancelMessageMoveTask is not available ({why})");
            Ok(ExitCode::from(2))
        }
    }
}
