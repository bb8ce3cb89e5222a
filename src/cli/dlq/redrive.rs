//! `orderfleet dlq redrive QUEUE`: move dead-lettered messages back to be processed.
//!
//! Without filters or a limit, from a standard queue, it starts SQS's native move task
//! (StartMessageMoveTask, always with the destination: messages the worker dead-lettered
//! itself have no redrive origin SQS could send them back to). `--wait` follows the task,
//! `orderfleet dlq cancel` stops it. With filters, a limit, `--client-side`, or on an endpoint
//! without move tasks (moto) it moves the messages itself, with a journal that makes a kill
//! and a rerun safe ([`crate::operator::journal`]); it says which on stderr.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};

use super::{audit, verdict, FilterArgs, VisibilityArg};
use crate::cli::PrefixArg;
use crate::domain::{mask, redaction};
use crate::infra::aws::Clients;
use crate::operator::journal;
use crate::operator::mover::{self, MoveOptions};
use crate::operator::native::{self, Native, MAX_RATE};
use crate::operator::plan::{self, Plan};
use crate::operator::progress::Progress;
use crate::operator::queue::{self, QueueRef};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Handler name (its DLQ), queue name or queue URL to move messages out of.
    pub queue: String,
    /// Where to move them: a handler name (its work queue), queue name or URL.
    /// Default: the queue the DLQ serves.
    #[arg(long, value_name = "QUEUE")]
    pub to: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Move at most N messages (client-side).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Messages moved per second at most (the native move task accepts 1 to 500).
    #[arg(long, value_name = "PER_SEC", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Print the plan (counts by detail-type and by failure reason, samples) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Follow a native move task until it ends.
    #[arg(long)]
    pub wait: bool,
    /// Move on the client side even where the native move task would do.
    #[arg(long)]
    pub client_side: bool,
    /// Journal of the client-side move. Default: resume the newest unfinished journal of the
    /// same source and target in --journal-dir, or start a new one there.
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,
    /// Directory of the client-side move journals.
    #[arg(long, env = "ORDERFLEET_JOURNAL_DIR", default_value = ".local/journal")]
    pub journal_dir: PathBuf,
    #[command(flatten)]
    pub visibility: VisibilityArg,
    /// How often `--wait` polls ListMessageMoveTasks.
    #[arg(long, default_value_t = 2000, hide = true)]
    pub poll_ms: u64,
    #[command(flatten)]
    pub prefix: PrefixArg,
    /// Print the plan or the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "--rate takes a positive number of messages per second, not {s:?}"
        )),
    }
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let clients = Clients::from_env().await;
    let sqs = &clients.sqs;
    let prefix = &args.prefix.prefix;
    let source = queue::resolve(sqs, prefix, &args.queue, queue::Role::Dlq).await?;
    let target = match &args.to {
        Some(to) => queue::resolve(sqs, prefix, to, queue::Role::Work).await?,
        None => queue::default_target(sqs, prefix, &source).await?,
    };
    if source.url == target.url {
        bail!(
            "the source and the target are the same queue ({})",
            source.name
        );
    }
    let native_possible = args.filter.filters.is_empty()
        && args.limit.is_none()
        && !args.client_side
        && !source.fifo
        && args.rate.map_or(true, |r| r <= f64::from(MAX_RATE));
    let method = if native_possible {
        "native"
    } else {
        "client-side"
    };

    if args.dry_run || !args.yes {
        let stop = super::stop_on_ctrl_c();
        let (matching, examined) = plan::peek(
            sqs,
            &source.url,
            Duration::from_secs(30),
            &args.filter.filters,
            args.limit,
            &stop,
        )
        .await?;
        let plan = Plan::new(
            &source.name,
            &target.name,
            method,
            &args.filter.filters,
            &matching,
            examined,
        );
        if args.dry_run {
            print_plan(&plan, args.json);
            return Ok(ExitCode::SUCCESS);
        }
        if !confirm(&plan)? {
            return Ok(ExitCode::from(2));
        }
    }

    if native_possible {
        // `None`: the endpoint has no move tasks; native_move said so on stderr.
        if let Some(code) = native_move(sqs, &source, &target, &args).await? {
            return Ok(code);
        }
    } else if args.filter.filters.is_empty() && !args.client_side {
        eprintln!(
            "redrive: moving on the client side ({})",
            why_client_side(&args, &source)
        );
    } else {
        eprintln!("redrive: moving on the client side (filters select the messages)");
    }
    client_side_move(sqs, &source, &target, &args).await
}

fn why_client_side(args: &Args, source: &QueueRef) -> &'static str {
    if source.fifo {
        "the source is a FIFO queue"
    } else if args.limit.is_some() {
        "--limit needs it"
    } else {
        "--rate above the native maximum of 500/s"
    }
}

fn print_plan(plan: &Plan, json: bool) {
    if json {
        println!("{}", serde_json::to_string(plan).unwrap_or_default());
        return;
    }
    println!(
        "dry run: would move {} of {} examined messages from {} to {} ({}){}",
        plan.matching,
        plan.examined,
        plan.source,
        plan.target,
        plan.method,
        if plan.filters.is_empty() {
            String::new()
        } else {
            format!(", filters: {}", plan.filters.join(" "))
        }
    );
    println!("by detail-type:");
    for (k, n) in &plan.by_detail_type {
        println!("  {n:>6}  {k}");
    }
    println!("by failure reason:");
    for (k, n) in &plan.by_reason {
        println!("  {n:>6}  {}", mask::emails_in(k));
    }
    for s in &plan.samples {
        println!(
            "sample {}: {} {} kind={} reason={}",
            s.message_id,
            s.detail_type.as_deref().unwrap_or("(not an event)"),
            s.event_id.as_deref().unwrap_or("-"),
            s.kind.as_deref().unwrap_or("-"),
            s.reason
                .as_deref()
                .map(mask::emails_in)
                .as_deref()
                .unwrap_or("-"),
        );
        // Masked: a dry run is read on a terminal, often shared; `dlq peek --json` and
        // `dlq export` show bodies in full.
        let body = redaction::body_for_display(&s.body);
        println!("  body: {}", super::cell(Some(&body), 300));
    }
    println!("dry run: nothing changed");
}

/// Asks on the terminal; refuses when there is none to ask on.
fn confirm(plan: &Plan) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "redrive: refusing to move {} message(s) from {} to {} without --yes; \
             see the plan first with --dry-run",
            plan.matching, plan.source, plan.target
        );
        return Ok(false);
    }
    print_plan(plan, false);
    eprint!("move them? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// Runs the native move task. `None` means the endpoint has none and the caller falls back.
async fn native_move(
    sqs: &aws_sdk_sqs::Client,
    source: &QueueRef,
    target: &QueueRef,
    args: &Args,
) -> Result<Option<ExitCode>> {
    match native::list(sqs, &source.arn).await? {
        Native::Unsupported(why) => {
            eprintln!(
                "redrive: native move tasks are not available ({why}); moving on the client side"
            );
            return Ok(None);
        }
        Native::Supported(tasks) => {
            if let Some(t) = tasks.iter().find(|t| t.running()) {
                eprintln!(
                    "redrive: a move task is already running on {} ({} moved so far); wait for it, \
                     or stop it with `orderfleet dlq cancel {}`",
                    source.name, t.moved, args.queue
                );
                return Ok(Some(ExitCode::from(2)));
            }
        }
    }
    let rate = args.rate.map(|r| (r.round() as i32).clamp(1, MAX_RATE));
    let handle = match native::start(sqs, &source.arn, Some(&target.arn), rate).await? {
        Native::Unsupported(why) => {
            eprintln!(
                "redrive: native move tasks are not available ({why}); moving on the client side"
            );
            return Ok(None);
        }
        Native::Supported(handle) => handle,
    };
    eprintln!(
        "redrive: started native move task from {} to {}{}",
        source.name,
        target.name,
        rate.map(|r| format!(" at {r}/s")).unwrap_or_default()
    );
    if !args.wait {
        audit(
            "redrive",
            &format!(
                "started native move task {handle} from {} to {}; follow it with `orderfleet status`, stop it with `orderfleet dlq cancel {}`",
                source.name, target.name, args.queue
            ),
        );
        if args.json {
            println!(
                "{}",
                serde_json::json!({"method": "native", "task_handle": handle, "source": source.name, "target": target.name})
            );
        }
        return Ok(Some(ExitCode::SUCCESS));
    }
    let stop = super::stop_on_ctrl_c();
    let mut progress = Progress::stderr(
        format!("moving {} -> {} (native)", source.name, target.name),
        None,
    );
    let last = loop {
        let tasks = match native::list(sqs, &source.arn).await {
            Ok(Native::Supported(tasks)) => tasks,
            Ok(Native::Unsupported(why)) => bail!("ListMessageMoveTasks stopped working: {why}"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "polling the move task failed; retrying");
                Vec::new()
            }
        };
        // The running task has our handle; once it ends SQS reports it first, without one.
        let ours = tasks
            .iter()
            .find(|t| t.handle.as_deref() == Some(handle.as_str()))
            .or_else(|| tasks.first().filter(|t| !t.running()));
        if let Some(t) = ours {
            progress.done = t.moved.max(0) as u64;
            progress.examined = t.moved.max(0) as u64;
            progress.tick();
            if !t.running() {
                break Some(t.clone());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(args.poll_ms)) => {}
            _ = stop.cancelled() => break None,
        }
    };
    progress.finish();
    let Some(task) = last else {
        eprintln!(
            "redrive: stopped waiting; the move task keeps running (`orderfleet dlq cancel {}` stops it)",
            args.queue
        );
        return Ok(Some(ExitCode::from(130)));
    };
    let of = task.to_move.map(|n| format!(" of {n}")).unwrap_or_default();
    let failure = task
        .failure_reason
        .as_deref()
        .map(|r| format!(", failure: {r}"))
        .unwrap_or_default();
    audit(
        "redrive",
        &format!(
            "native move task {} {}: moved {}{of} from {} to {}{failure}",
            handle, task.status, task.moved, source.name, target.name
        ),
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({"method": "native", "task_handle": handle, "task": task})
        );
    }
    Ok(Some(if task.status == "COMPLETED" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }))
}

async fn client_side_move(
    sqs: &aws_sdk_sqs::Client,
    source: &QueueRef,
    target: &QueueRef,
    args: &Args,
) -> Result<ExitCode> {
    let journal_path = match &args.journal {
        Some(p) => p.clone(),
        None => match journal::find_unfinished(&args.journal_dir, &source.name, &target.name)? {
            Some(p) => {
                eprintln!(
                    "redrive: resuming the unfinished move in journal {}",
                    p.display()
                );
                p
            }
            None => journal::new_path(&args.journal_dir, &source.name, &target.name),
        },
    };
    let opts = MoveOptions {
        filters: args.filter.filters.clone(),
        limit: args.limit,
        rate: args.rate,
        visibility: args.visibility.duration(),
        journal: journal_path,
        crash_at: None,
    };
    let total = queue::counts(sqs, &source.url)
        .await
        .ok()
        .map(|c| c.visible);
    let mut progress =
        Progress::stderr(format!("moving {} -> {}", source.name, target.name), total);
    let stop = super::stop_on_ctrl_c();
    let report = mover::move_messages(sqs, source, target, &opts, &stop, &mut progress).await?;
    let filters = if opts.filters.is_empty() {
        "no filters".to_string()
    } else {
        format!(
            "filters: {}",
            args.filter
                .filters
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    let mut extra = String::new();
    if report.completed_from_journal > 0 {
        extra.push_str(&format!(
            ", {} finished from the journal",
            report.completed_from_journal
        ));
    }
    if report.in_doubt_resent > 0 {
        extra.push_str(&format!(
            ", {} in doubt sent again (same redrive key)",
            report.in_doubt_resent
        ));
    }
    if report.undeleted > 0 {
        extra.push_str(&format!(
            ", {} sent but not yet deleted from the source (rerun)",
            report.undeleted
        ));
    }
    if report.interrupted {
        extra.push_str(", interrupted (rerun to continue)");
    }
    audit(
        "redrive",
        &format!(
            "moved {} of {} matching from {} to {} ({filters}), {} failed{extra}, journal {}",
            report.moved + report.in_doubt_resent,
            report.matched,
            source.name,
            target.name,
            report.failed,
            report.journal.display()
        ),
    );
    for e in &report.errors {
        eprintln!("redrive: failed: {e}");
    }
    if report.in_flight_elsewhere > 0 {
        eprintln!(
            "redrive: {} message(s) in {} are hidden by another reader and were not examined; rerun later",
            report.in_flight_elsewhere, source.name
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    }
    Ok(verdict(
        report.interrupted,
        report.failed + report.undeleted,
    ))
}
