//! `orderfleet status [--watch] [--json]`: every handler's queue beside its DLQ, running move
//! tasks, and the live workers, on one screen. See [`crate::operator::status`] for where each
//! number comes from (notably why the oldest message's age may be `-`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::cli::PrefixArg;
use crate::infra::aws;
use crate::infra::topology::Topology;
use crate::operator::message::format_age;
use crate::operator::status::{self, OutboxStatus, QueueStatus, WorkerStatus};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub prefix: PrefixArg,
    /// PostgreSQL connection URL, for the workers' heartbeats (without it, no workers are shown).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// A worker whose last heartbeat is older than this is marked stale (3x the worker's
    /// default --heartbeat-secs of 10).
    #[arg(long, env = "ORDERFLEET_STALE_AFTER_SECS", default_value_t = 30)]
    pub stale_after_secs: u64,
    /// Redraw every --interval-secs until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    #[arg(long, default_value_t = 2, requires = "watch")]
    pub interval_secs: u64,
    /// Print {"queues": [...], "workers": [...], "outbox": {...}} (with --watch, one line per
    /// refresh).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let config = aws::sdk_config().await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let cloudwatch = aws_sdk_cloudwatch::Client::new(&config);
    let topo = Topology::with_prefix(&args.prefix.prefix);
    let pool = match &args.database_url {
        Some(url) => Some(crate::store::db::pool(url, 2)?),
        None => None,
    };
    let stale_after = Duration::from_secs(args.stale_after_secs);
    loop {
        let queues = status::queues(&sqs, Some(&cloudwatch), &topo).await;
        let workers = match &pool {
            Some(pool) => status::workers(pool, stale_after).await.map(Some),
            None => Ok(None),
        };
        let outbox = match &pool {
            Some(pool) => status::outbox(pool).await.map(Some),
            None => Ok(None),
        };
        if args.json {
            let (workers, error) = match &workers {
                Ok(w) => (w.clone().unwrap_or_default(), None),
                Err(e) => (Vec::new(), Some(format!("{e:#}"))),
            };
            let mut doc = json!({"queues": queues, "workers": workers});
            if let Some(e) = error {
                doc["workers_error"] = json!(e);
            }
            match &outbox {
                Ok(Some(o)) => doc["outbox"] = json!(o),
                Ok(None) => {}
                Err(e) => doc["outbox_error"] = json!(format!("{e:#}")),
            }
            println!("{doc}");
        } else {
            if args.watch {
                // Clear the screen and go home: a redraw, not a scroll.
                print!("\x1b[2J\x1b[H");
            }
            print_queues(&topo, &queues);
            println!();
            match &workers {
                Ok(Some(w)) => print_workers(w, args.stale_after_secs),
                Ok(None) => println!("workers: give --database-url (or DATABASE_URL) to see them"),
                Err(e) => println!("workers: {e:#}"),
            }
            match &outbox {
                Ok(Some(o)) => print_outbox(o),
                Ok(None) => {}
                Err(e) => println!("outbox: {e:#}"),
            }
        }
        if !args.watch {
            let all_readable = queues.iter().all(|q| q.error.is_none());
            return Ok(if all_readable && workers.is_ok() && outbox.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.interval_secs.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn num(n: Option<u64>) -> String {
    n.map_or("-".into(), |n| n.to_string())
}

fn print_queues(topo: &Topology, queues: &[QueueStatus]) {
    println!("queues (prefix {})", topo.prefix);
    println!(
        "{:<16} {:>8} {:>9} {:>8} {:>7} {:>6} {:>9}  NOTE",
        "HANDLER", "VISIBLE", "IN FLIGHT", "DELAYED", "OLDEST", "DLQ", "MOVES"
    );
    for q in queues {
        let moves = match (q.move_tasks, q.move_progress) {
            (None, _) => "n/a".to_string(),
            (Some(n), Some((moved, Some(of)))) => format!("{n} {moved}/{of}"),
            (Some(n), _) => n.to_string(),
        };
        let mut note = String::new();
        if let Some(e) = &q.error {
            note = e.clone();
        } else if q.dlq_depth.unwrap_or(0) > 0 {
            note = format!("dlq peek {}", q.handler);
        }
        println!(
            "{:<16} {:>8} {:>9} {:>8} {:>7} {:>6} {:>9}  {}",
            q.handler,
            num(q.visible),
            num(q.in_flight),
            num(q.delayed),
            q.oldest_age_secs
                .map_or("-".into(), |s| format_age(s as i64)),
            num(q.dlq_depth),
            moves,
            note
        );
    }
}

fn print_outbox(o: &OutboxStatus) {
    println!();
    println!("outbox: {} waiting to be published", o.pending);
    if o.dead_letters > 0 {
        println!(
            "OUTBOX DEAD LETTERS: {} event(s) EventBridge will never accept, in table outbox_dead_letters; last reason: {}",
            o.dead_letters,
            o.last_reason.as_deref().unwrap_or("-")
        );
    }
}

fn print_workers(workers: &[WorkerStatus], stale_after_secs: u64) {
    let live = workers.iter().filter(|w| w.state == "live").count();
    println!(
        "workers: {live} live of {} seen in the last hour (stale: no heartbeat for {stale_after_secs}s)",
        workers.len()
    );
    if workers.is_empty() {
        return;
    }
    println!(
        "{:<8} {:<28} {:<20} {:>7} {:<9} {:>8} {:>9} {:>10} {:>7}",
        "STATE", "HANDLERS", "HOST", "PID", "VERSION", "UP", "LAST SEEN", "PROCESSED", "FAILED"
    );
    let now = chrono::Utc::now();
    for w in workers {
        let state = match w.state.as_str() {
            "live" => "live".to_string(),
            other => other.to_uppercase(),
        };
        println!(
            "{:<8} {:<28} {:<20} {:>7} {:<9} {:>8} {:>9} {:>10} {:>7}",
            state,
            super::dlq::cell(Some(&w.handlers.join(",")), 28),
            super::dlq::cell(Some(&w.host), 20),
            w.pid,
            super::dlq::cell(Some(&w.version), 9),
            format_age((now - w.started_at).num_seconds().max(0)),
            format!("{} ago", format_age(w.last_seen_secs_ago.max(0))),
            w.processed,
            w.failed
        );
    }
}
