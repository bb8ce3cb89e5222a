//! `orderfleet dlq peek QUEUE`: the messages of a DLQ with their failure reasons.
//!
//! Peeking is a receive (SQS has no other read), so it raises each message's receive count;
//! it resets visibility to 0 at the end so nothing stays hidden. See
//! [`crate::operator::scan`] for the details, and `docs/operations.md`.

use std::process::ExitCode;

use anyhow::Result;
use chrono::Utc;

use super::{cell, FilterArgs, VisibilityArg};
use crate::cli::PrefixArg;
use crate::domain::mask;
use crate::infra::aws::Clients;
use crate::operator::message::format_age;
use crate::operator::{plan, queue};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Handler name (its DLQ), queue name or queue URL.
    pub queue: String,
    /// Messages to show at most.
    #[arg(long, default_value_t = 10)]
    pub limit: u64,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub visibility: VisibilityArg,
    #[command(flatten)]
    pub prefix: PrefixArg,
    /// Print the messages as JSON, bodies included and unmasked: customer emails, names,
    /// addresses and payment tokens as the producer sent them. The table hides them.
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
    let depth = queue::counts(&clients.sqs, &q.url).await?;
    let stop = super::stop_on_ctrl_c();
    let (found, examined) = plan::peek(
        &clients.sqs,
        &q.url,
        args.visibility.duration(),
        &args.filter.filters,
        Some(args.limit),
        &stop,
    )
    .await?;
    let now = Utc::now();
    if args.json {
        let messages: Vec<_> = found.iter().map(|m| m.summary(now)).collect();
        println!(
            "{}",
            serde_json::json!({
                "queue": q.name,
                "visible": depth.visible,
                "in_flight": depth.in_flight,
                "examined": examined,
                "messages": messages,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: ~{} visible, {} in flight; showing {} of {} examined (receive counts include this peek)",
        q.name,
        depth.visible,
        depth.in_flight,
        found.len(),
        examined
    );
    println!(
        "{:<36}  {:<22}  {:<24}  {:<9}  {:>4}  {:>6}  {:>5}  REASON",
        "EVENT ID", "SOURCE", "DETAIL-TYPE", "KIND", "RECV", "FAILED", "AGE"
    );
    for m in &found {
        let failed = m.failed_after().map(|n| format!("{n}x"));
        let age = m.age_secs(now).map(format_age);
        println!(
            "{:<36}  {:<22}  {:<24}  {:<9}  {:>4}  {:>6}  {:>5}  {}",
            cell(m.event_id().or(Some("(not an event)")), 36),
            cell(m.source(), 22),
            cell(m.detail_type(), 24),
            cell(m.kind(), 9),
            m.receive_count(),
            cell(failed.as_deref(), 6),
            cell(age.as_deref(), 5),
            cell(m.reason().map(mask::emails_in).as_deref(), 200),
        );
    }
    Ok(ExitCode::SUCCESS)
}
