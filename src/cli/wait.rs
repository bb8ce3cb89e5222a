//! `orderfleet wait --timeout-secs T [--orders-expected N] [--run-id ID]`: polls PostgreSQL
//! until every order of a simulator run is terminal and the outbox is drained, with a progress
//! line on stderr every second.
//!
//! How it knows what to wait for: `orderfleet publish` records each run in `simulator_runs`
//! (its order-id prefix and how many orders it put on the bus). By default `wait` follows the
//! latest run, or the one named by `--run-id`, and waits for that many orders with that prefix.
//! `--orders-expected N` overrides the count; without any recorded run it means "at least N
//! orders in the database, all terminal".

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::cli::simulator;
use crate::cli::DatabaseArg;
use crate::operator::report::{self, OrderCounts};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub db: DatabaseArg,
    /// Give up (exit 1) after this long.
    #[arg(long, env = "ORDERFLEET_WAIT_TIMEOUT_SECS", default_value_t = 300)]
    pub timeout_secs: u64,
    /// Orders to wait for; default: the number the simulator run published.
    #[arg(long)]
    pub orders_expected: Option<u64>,
    /// The simulator run to wait for; default: the latest.
    #[arg(long, env = "ORDERFLEET_RUN_ID")]
    pub run_id: Option<String>,
    /// Time between polls (and progress lines).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub interval_ms: u64,
}

/// One look at the database.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    orders: OrderCounts,
    unpublished: i64,
    expected: i64,
    /// The publisher is still putting orders on the bus.
    publishing: bool,
}

impl Progress {
    fn done(&self) -> bool {
        !self.publishing
            && self.orders.terminal >= self.expected
            && self.orders.in_flight == 0
            && self.unpublished == 0
    }

    fn line(&self) -> String {
        let statuses: Vec<String> = self
            .orders
            .by_status
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        format!(
            "orders: {}/{} terminal ({}); outbox: {} unpublished{}",
            self.orders.terminal,
            self.expected,
            if statuses.is_empty() {
                "none yet".to_string()
            } else {
                statuses.join(", ")
            },
            self.unpublished,
            if self.publishing {
                "; publisher still running"
            } else {
                ""
            }
        )
    }
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let db = pool.get().await.context("connecting to the database")?;
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout_secs);
    let interval = Duration::from_millis(args.interval_ms);
    let expected_override = args
        .orders_expected
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX));

    let run = simulator::find_run(&db, args.run_id.as_deref()).await?;
    let prefix = match (&run, expected_override) {
        (Some(run), _) => {
            eprintln!(
                "wait: run {} (order ids {}*), {} orders planned",
                run.run_id, run.order_id_prefix, run.orders_planned
            );
            run.order_id_prefix.clone()
        }
        (None, Some(_)) if args.run_id.is_none() => String::new(),
        (None, _) => match &args.run_id {
            Some(id) => bail!("no simulator run {id:?} in simulator_runs; check the id `orderfleet publish` printed"),
            None => bail!(
                "no simulator run is recorded (run `orderfleet publish` first), so there is no \
                 count to wait for; pass --orders-expected N to wait for N orders"
            ),
        },
    };
    let run_id = run.as_ref().map(|r| r.run_id.clone());

    loop {
        let run = match &run_id {
            Some(id) => simulator::find_run(&db, Some(id)).await?,
            None => None,
        };
        let publishing = run.as_ref().is_some_and(|r| !r.finished);
        let expected = expected_override
            .or_else(|| run.as_ref().map(|r| i64::from(r.orders_published)))
            .unwrap_or(0);
        let orders = report::count_orders(&db, &prefix).await?;
        let unpublished: i64 = db
            .query_one(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .await
            .context("counting unpublished outbox rows")?
            .get(0);
        let p = Progress {
            orders,
            unpublished,
            expected,
            publishing,
        };
        eprintln!("wait: {}", p.line());
        if p.done() {
            eprintln!(
                "wait: every order is terminal and the outbox is drained after {:.1}s",
                started.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() >= timeout {
            eprintln!(
                "wait: timed out after {}s: {}. Are the workers running with every saga handler \
                 (orders, inventory, payments, fulfillment)? Look for dead letters with \
                 `orderfleet status`.",
                args.timeout_secs,
                p.line()
            );
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn progress(terminal: i64, in_flight: i64, unpublished: i64, publishing: bool) -> Progress {
        Progress {
            orders: OrderCounts::new(BTreeMap::from([
                ("completed".to_string(), terminal),
                ("accepted".to_string(), in_flight),
            ])),
            unpublished,
            expected: 10,
            publishing,
        }
    }

    #[test]
    fn waiting_ends_only_when_all_orders_are_terminal_and_the_outbox_is_empty() {
        assert!(progress(10, 0, 0, false).done());
        assert!(!progress(9, 0, 0, false).done());
        assert!(!progress(10, 1, 0, false).done());
        assert!(!progress(10, 0, 1, false).done());
        assert!(!progress(10, 0, 0, true).done());
    }

    #[test]
    fn the_progress_line_names_every_status() {
        let line = progress(7, 3, 2, false).line();
        assert_eq!(
            line,
            "orders: 7/10 terminal (accepted 3, completed 7); outbox: 2 unpublished"
        );
    }
}
