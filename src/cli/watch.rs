//! `orderfleet watch [--interval-secs 2] [--once] [--json]`: a live summary of a running fleet
//! for the person who started it: orders by outcome, what each handler applied per second,
//! queue and DLQ depths, the outbox, and the emails with where they went. `make run` shows it
//! while the workers' logs go to a file, which the summary names (`--worker-log`).
//!
//! On a terminal the screen is redrawn in place every interval; otherwise (a pipe, a file)
//! each interval prints one line. `--json` prints one JSON object per interval, and
//! `--once --json` exactly one, which is what scripts and tests read. See
//! [`crate::operator::watch`] for where each figure comes from.
//!
//! Which orders count: those of the latest simulator run (`orderfleet publish` records each
//! run), looked up again at every refresh so that a second `orderfleet publish` is followed;
//! or those of `--run-id`, counted by their order ids even before the publisher has recorded
//! the run; or, with `--all-orders` or on a database without simulator runs (production),
//! every order.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use crate::cli::simulator::{self, Plan, Run};
use crate::cli::{DatabaseArg, PrefixArg};
use crate::infra::aws;
use crate::infra::topology::Topology;
use crate::operator::watch::{self, Snapshot, Sources};
use crate::providers::email::DEFAULT_OUTBOX_DIR;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub prefix: PrefixArg,
    #[command(flatten)]
    pub db: DatabaseArg,
    /// Time between refreshes.
    #[arg(long, env = "ORDERFLEET_WATCH_INTERVAL_SECS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval_secs: u64,
    /// Handlers' rates are the events they applied over this many past seconds.
    #[arg(long, env = "ORDERFLEET_WATCH_RATE_WINDOW_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub rate_window_secs: u64,
    /// Look once, print, and exit (0 when everything could be read, 1 otherwise).
    #[arg(long)]
    pub once: bool,
    /// One JSON object per refresh instead of the screen or line.
    #[arg(long)]
    pub json: bool,
    /// Count the orders of this simulator run (also before `orderfleet publish` has recorded
    /// it); default: the latest run.
    #[arg(long, env = "ORDERFLEET_RUN_ID", conflicts_with = "all_orders")]
    pub run_id: Option<String>,
    /// Count every order in the database, not only the latest simulator run's.
    #[arg(long)]
    pub all_orders: bool,
    /// A worker whose last heartbeat is older than this does not count as running.
    #[arg(long, env = "ORDERFLEET_STALE_AFTER_SECS", default_value_t = 30)]
    pub stale_after_secs: u64,
    /// The file transport's directory, to say where the emails are (the workers' setting).
    #[arg(long, env = "ORDERFLEET_EMAIL_OUTBOX_DIR", default_value = DEFAULT_OUTBOX_DIR)]
    pub email_outbox_dir: PathBuf,
    /// Where the workers' logs go, named on the screen (`make run` sets it).
    #[arg(long, env = "ORDERFLEET_WORKER_LOG")]
    pub worker_log: Option<PathBuf>,
}

/// How a refresh is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Redrawn in place on a terminal.
    Screen,
    /// One line per refresh.
    Line,
    /// One JSON object per refresh.
    Json,
}

/// A snapshot with what the CLI knows beside it: the run and the places a person looks.
struct View {
    snapshot: Snapshot,
    prefix: String,
    interval_secs: u64,
    run: Option<Run>,
    /// The run `--run-id` names, recorded or not.
    run_id: Option<String>,
    email_dir: PathBuf,
    /// `.eml` files in `email_dir`; `None` when it does not exist (yet).
    email_files: Option<usize>,
    worker_log: Option<PathBuf>,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let output = if args.json {
        Output::Json
    } else if std::io::stdout().is_terminal() && !args.once {
        Output::Screen
    } else {
        Output::Line
    };
    let config = aws::sdk_config().await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let topo = Topology::with_prefix(&args.prefix.prefix);
    let pool = crate::store::db::pool(&args.db.database_url, 4)?;
    let email_dir = absolute(&args.email_outbox_dir);
    let worker_log = args.worker_log.as_deref().map(absolute);
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let (run, run_error) = if args.all_orders {
            (None, None)
        } else {
            match find_run(&pool, args.run_id.as_deref()).await {
                Ok(run) => (run, None),
                Err(e) => (None, Some(format!("{e:#}"))),
            }
        };
        // A run named by --run-id counts by its order ids even before `orderfleet publish`
        // has recorded it (make run starts the watch and the publisher together).
        let prefix = match (&run, &args.run_id) {
            (Some(run), _) => run.order_id_prefix.clone(),
            (None, Some(id)) if !args.all_orders => Plan::order_id_prefix(id),
            (None, _) => String::new(),
        };
        let mut snapshot = watch::snapshot(&Sources {
            pool: &pool,
            sqs: &sqs,
            topo: &topo,
            order_id_prefix: &prefix,
            window: Duration::from_secs(args.rate_window_secs),
            stale_after: Duration::from_secs(args.stale_after_secs),
        })
        .await;
        snapshot.errors.extend(run_error);
        let view = View {
            snapshot,
            prefix: topo.prefix.clone(),
            interval_secs: args.interval_secs,
            run,
            run_id: args.run_id.clone().filter(|_| !args.all_orders),
            email_files: count_eml(&email_dir),
            email_dir: email_dir.clone(),
            worker_log: worker_log.clone(),
        };
        let text = match output {
            Output::Json => format!("{}\n", to_json(&view)),
            Output::Line => format!("{}\n", line(&view)),
            // Home, the frame with each line cleared to its end, then the rest of the screen
            // cleared: a redraw without the flicker of clearing everything first.
            Output::Screen => format!("\x1b[H{}\x1b[J", screen(&view).replace('\n', "\x1b[K\n")),
        };
        let mut out = std::io::stdout().lock();
        // A closed pipe (`watch | head`) ends the watch.
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return Ok(ExitCode::SUCCESS);
        }
        drop(out);
        if args.once {
            return Ok(if view.snapshot.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.interval_secs)) => {}
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// Ctrl-C, or the SIGTERM `make run` sends when it stops.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn find_run(pool: &deadpool_postgres::Pool, run_id: Option<&str>) -> Result<Option<Run>> {
    let db = pool
        .get()
        .await
        .context("cannot connect to PostgreSQL; check DATABASE_URL (locally: `make up`)")?;
    simulator::find_run(&db, run_id).await
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn count_eml(dir: &Path) -> Option<usize> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .count(),
    )
}

/// The orders a person asks about first, in the order they are shown.
const OUTCOMES: [&str; 4] = ["completed", "cancelled", "rejected", "returned"];

fn to_json(v: &View) -> Value {
    let s = &v.snapshot;
    let mut orders = json!({
        "scope": if v.run.is_some() || v.run_id.is_some() { "run" } else { "all" },
        "published": v.run.as_ref().map(|r| r.orders_published),
        "placed": s.orders.total,
        "in_flight": s.orders.in_flight,
        "by_status": s.orders.by_status,
    });
    for status in OUTCOMES {
        orders[status] = json!(s.orders.status(status));
    }
    json!({
        "at": s.at,
        "prefix": v.prefix,
        "interval_secs": v.interval_secs,
        "window_secs": s.window_secs,
        "run": v.run,
        "orders": orders,
        "handlers": s.handlers,
        "workers_live": s.workers_live,
        "outbox": s.outbox,
        "emails": {
            "sent": s.emails.sent,
            "failed": s.emails.failed,
            "by_kind": s.emails.by_kind,
            "sent_by_transport": s.emails.sent_by_transport,
            "outbox_dir": v.email_dir,
            "outbox_files": v.email_files,
        },
        "worker_log": v.worker_log,
        "errors": s.errors,
    })
}

fn num(n: Option<u64>) -> String {
    n.map_or("-".into(), |n| n.to_string())
}

/// "run abc (20 of 20 published)", or "all orders".
fn scope(v: &View) -> String {
    match (&v.run, &v.run_id) {
        (Some(r), _) => format!(
            "run {} ({} of {} published{})",
            r.run_id,
            r.orders_published,
            r.orders_planned,
            if r.finished { "" } else { ", publishing" }
        ),
        (None, Some(id)) => format!("run {id} (not published yet)"),
        (None, None) => "all orders".into(),
    }
}

/// Where the emails went, by transport: "as .eml files in DIR (N files there)".
fn email_places(v: &View) -> Vec<String> {
    v.snapshot
        .emails
        .sent_by_transport
        .iter()
        .map(|(transport, n)| match transport.as_str() {
            "file" => format!(
                "{n} as .eml files in {}{}",
                v.email_dir.display(),
                v.email_files
                    .map(|f| format!(" ({f} files there)"))
                    .unwrap_or_default()
            ),
            "smtp" => format!("{n} to the SMTP relay"),
            "ses" => format!("{n} through Amazon SES"),
            other => format!("{n} by {other}"),
        })
        .collect()
}

/// The screen drawn on a terminal.
fn screen(v: &View) -> String {
    let s = &v.snapshot;
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(
        out,
        "orderfleet watch · prefix {} · {} UTC · every {}s · Ctrl-C stops",
        v.prefix,
        s.at.format("%H:%M:%S"),
        v.interval_secs
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "ORDERS  {}", scope(v));
    let mut figures = format!(
        "  placed {}   in flight {}",
        s.orders.total, s.orders.in_flight
    );
    for status in OUTCOMES {
        let _ = write!(figures, "   {status} {}", s.orders.status(status));
    }
    let _ = writeln!(out, "{figures}");
    let moving: Vec<String> = s
        .orders
        .by_status
        .iter()
        .filter(|(status, _)| {
            !crate::operator::report::TERMINAL_STATUSES.contains(&status.as_str())
        })
        .map(|(status, n)| format!("{status} {n}"))
        .collect();
    if !moving.is_empty() {
        let _ = writeln!(out, "  in flight: {}", moving.join(", "));
    }
    if let Some(r) = &v.run {
        let unseen = i64::from(r.orders_published) - s.orders.total;
        if unseen > 0 {
            let _ = writeln!(
                out,
                "  {unseen} published but not yet taken in by the orders handler"
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>7} {:>9} {:>6} {:>9} {:>6}  NOTE",
        "HANDLER",
        "WORKERS",
        "MSG/S",
        format!("LAST {}S", s.window_secs as u64),
        "QUEUE",
        "IN FLIGHT",
        "DLQ"
    );
    for h in &s.handlers {
        let note = if let Some(e) = &h.error {
            e.clone()
        } else if h.dlq_depth.unwrap_or(0) > 0 {
            format!("dead letters: orderfleet dlq peek {}", h.handler)
        } else if h.workers == 0 {
            "no live worker".into()
        } else {
            String::new()
        };
        let row = format!(
            "{:<16} {:>7} {:>7.1} {:>9} {:>6} {:>9} {:>6}  {}",
            h.handler,
            h.workers,
            h.per_sec,
            h.applied,
            num(h.queue_visible),
            num(h.queue_in_flight),
            num(h.dlq_depth),
            note
        );
        let _ = writeln!(out, "{}", row.trim_end());
    }
    let _ = writeln!(out);
    if let Some(o) = &s.outbox {
        let _ = write!(out, "outbox  {} waiting to be published", o.pending);
        if o.dead_letters > 0 {
            let _ = write!(
                out,
                "; {} DEAD LETTERS (table outbox_dead_letters)",
                o.dead_letters
            );
        }
        let _ = writeln!(out);
    }
    let e = &s.emails;
    let kinds: Vec<String> = e.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = write!(out, "emails  {} sent", e.sent);
    if !kinds.is_empty() {
        let _ = write!(out, " ({})", kinds.join(", "));
    }
    if e.failed > 0 {
        let _ = write!(out, "; {} failed for good", e.failed);
    }
    let _ = writeln!(out);
    for place in email_places(v) {
        let _ = writeln!(out, "        {place}");
    }
    if let Some(log) = &v.worker_log {
        let _ = writeln!(out, "logs    {}", log.display());
    }
    for err in &s.errors {
        let _ = writeln!(out, "ERROR   {err}");
    }
    out
}

/// One line per refresh, for a pipe or a file.
fn line(v: &View) -> String {
    let s = &v.snapshot;
    let mut out = format!(
        "{} orders ({}): {} placed, {} in flight",
        s.at.format("%H:%M:%S"),
        scope(v),
        s.orders.total,
        s.orders.in_flight
    );
    for status in OUTCOMES {
        let _ = write!(out, ", {} {status}", s.orders.status(status));
    }
    let busy: Vec<String> = s
        .handlers
        .iter()
        .filter(|h| h.applied > 0)
        .map(|h| format!("{} {:.1}", h.handler, h.per_sec))
        .collect();
    let _ = write!(
        out,
        "; msg/s: {}",
        if busy.is_empty() {
            "idle".to_string()
        } else {
            busy.join(" ")
        }
    );
    let waiting: u64 = s.handlers.iter().filter_map(|h| h.queue_visible).sum();
    let dead: u64 = s.handlers.iter().filter_map(|h| h.dlq_depth).sum();
    let _ = write!(out, "; queued {waiting}, DLQ {dead}");
    if let Some(o) = &s.outbox {
        let _ = write!(out, "; outbox {}", o.pending);
    }
    let _ = write!(out, "; emails {}", s.emails.sent);
    if !s.errors.is_empty() {
        let _ = write!(out, "; ERRORS: {}", s.errors.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::report::{EmailCounts, OrderCounts};
    use crate::operator::watch::HandlerActivity;
    use std::collections::BTreeMap;

    fn view() -> View {
        let handler = |name: &str, applied: i64, dlq: u64, workers: usize| HandlerActivity {
            handler: name.into(),
            workers,
            applied,
            per_sec: applied as f64 / 10.0,
            queue_visible: Some(1),
            queue_in_flight: Some(0),
            queue_delayed: Some(0),
            dlq_depth: Some(dlq),
            error: None,
        };
        View {
            snapshot: Snapshot {
                at: chrono::DateTime::parse_from_rfc3339("2026-12-06T17:00:00Z")
                    .unwrap()
                    .into(),
                window_secs: 10.0,
                orders: OrderCounts::new(BTreeMap::from([
                    ("accepted".into(), 2),
                    ("completed".into(), 15),
                    ("cancelled".into(), 2),
                    ("rejected".into(), 1),
                ])),
                handlers: vec![
                    handler("orders", 45, 0, 1),
                    handler("payments", 0, 2, 1),
                    handler("storefront", 0, 0, 0),
                ],
                workers_live: 1,
                outbox: Some(crate::operator::status::OutboxStatus {
                    pending: 3,
                    dead_letters: 0,
                    last_reason: None,
                }),
                emails: EmailCounts {
                    by_kind: BTreeMap::from([("confirmation".into(), 17)]),
                    sent_by_transport: BTreeMap::from([("file".into(), 17)]),
                    sent: 17,
                    failed: 0,
                },
                errors: vec![],
            },
            prefix: "orderfleet".into(),
            interval_secs: 2,
            run: Some(Run {
                run_id: "r1".into(),
                order_id_prefix: "ord-r1-".into(),
                orders_planned: 25,
                orders_published: 22,
                finished: false,
            }),
            run_id: None,
            email_dir: PathBuf::from("/srv/shop/.local/outbox"),
            email_files: Some(17),
            worker_log: Some(PathBuf::from("/srv/shop/.local/run-1.log")),
        }
    }

    #[test]
    fn the_screen_answers_did_my_orders_go_through_and_where_to_look() {
        let text = screen(&view());
        assert!(
            text.contains("run r1 (22 of 25 published, publishing)"),
            "{text}"
        );
        assert!(
            text.contains("placed 20   in flight 2   completed 15   cancelled 2   rejected 1"),
            "{text}"
        );
        assert!(text.contains("in flight: accepted 2"), "{text}");
        assert!(
            text.contains("2 published but not yet taken in by the orders handler"),
            "{text}"
        );
        let orders = text.lines().find(|l| l.starts_with("orders ")).unwrap();
        assert_eq!(
            orders.split_whitespace().collect::<Vec<_>>(),
            ["orders", "1", "4.5", "45", "1", "0", "0"]
        );
        assert!(
            text.contains("dead letters: orderfleet dlq peek payments"),
            "{text}"
        );
        assert!(text.contains("no live worker"), "{text}");
        assert!(
            text.contains("17 as .eml files in /srv/shop/.local/outbox (17 files there)"),
            "{text}"
        );
        assert!(
            text.contains("logs    /srv/shop/.local/run-1.log"),
            "{text}"
        );
    }

    #[test]
    fn a_line_names_the_outcomes_and_only_the_busy_handlers() {
        let text = line(&view());
        assert_eq!(
            text,
            "17:00:00 orders (run r1 (22 of 25 published, publishing)): 20 placed, 2 in flight, \
             15 completed, 2 cancelled, 1 rejected, 0 returned; msg/s: orders 4.5; queued 3, \
             DLQ 2; outbox 3; emails 17"
        );
    }

    #[test]
    fn the_json_snapshot_carries_the_counts_tests_and_scripts_read() {
        let doc = to_json(&view());
        assert_eq!(doc["orders"]["placed"], 20);
        assert_eq!(doc["orders"]["published"], 22);
        assert_eq!(doc["orders"]["completed"], 15);
        assert_eq!(doc["orders"]["returned"], 0);
        assert_eq!(doc["handlers"][0]["per_sec"], 4.5);
        assert_eq!(doc["handlers"][1]["dlq_depth"], 2);
        assert_eq!(doc["emails"]["outbox_dir"], "/srv/shop/.local/outbox");
        assert_eq!(doc["worker_log"], "/srv/shop/.local/run-1.log");
    }
}
