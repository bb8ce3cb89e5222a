//! The facts behind `orderfleet watch`: one look at a running fleet, for the person who started
//! it and wants to know whether their orders are going through.
//!
//! Every figure comes from a place that already has it, read with the queries `status`,
//! `report` and `wait` use:
//!
//! - orders by status: the `orders` table ([`report::count_orders`]);
//! - events each handler applied lately: the inbox's `processed_at`
//!   ([`inbox::applied_within`]); a redelivered duplicate adds no row, so it is not counted;
//! - queue and DLQ depths: GetQueueAttributes ([`status::queues`], without CloudWatch: a
//!   one-minute metric says nothing to a screen redrawn every two seconds);
//! - workers: their heartbeats ([`status::workers`]);
//! - the outbox's backlog ([`status::outbox`]) and the emails ([`report::count_emails`]).
//!
//! A part that cannot be read is reported in [`Snapshot::errors`] and the rest is still shown:
//! a watch that goes blank when one queue is missing would hide what it is for.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;

use super::report::{self, EmailCounts, OrderCounts};
use super::status::{self, OutboxStatus, QueueStatus, WorkerStatus};
use crate::infra::topology::Topology;
use crate::store::inbox;

/// One handler: who runs it, how fast it works, and what waits for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HandlerActivity {
    pub handler: String,
    /// Live workers running this handler (heartbeats younger than the stale threshold).
    pub workers: usize,
    /// Events applied in the window.
    pub applied: i64,
    /// `applied` per second of the window.
    pub per_sec: f64,
    /// Messages waiting in the work queue (`None`: unreadable, see `error`).
    pub queue_visible: Option<u64>,
    /// Messages received and not yet deleted: being handled, or waiting for a retry.
    pub queue_in_flight: Option<u64>,
    /// Messages sent with a delay that has not run out.
    pub queue_delayed: Option<u64>,
    /// Messages in the DLQ.
    pub dlq_depth: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One look at the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub at: DateTime<Utc>,
    /// The window the handlers' rates are measured over.
    pub window_secs: f64,
    pub orders: OrderCounts,
    pub handlers: Vec<HandlerActivity>,
    /// Live workers, whatever their handlers.
    pub workers_live: usize,
    pub outbox: Option<OutboxStatus>,
    pub emails: EmailCounts,
    /// What could not be read, one line each.
    pub errors: Vec<String>,
}

/// Where a snapshot reads from.
pub struct Sources<'a> {
    pub pool: &'a Pool,
    pub sqs: &'a aws_sdk_sqs::Client,
    pub topo: &'a Topology,
    /// Only orders (and their emails) whose id starts with this count; `""`: every order.
    pub order_id_prefix: &'a str,
    /// Rates are measured over this much of the recent past.
    pub window: Duration,
    /// A worker whose heartbeat is older than this does not count as running its handlers.
    pub stale_after: Duration,
}

/// Takes one snapshot. The SQS calls and the database queries run concurrently.
pub async fn snapshot(src: &Sources<'_>) -> Snapshot {
    let mut errors = Vec::new();
    let (queues, workers, outbox, db_parts) = tokio::join!(
        status::queues(src.sqs, None, src.topo),
        status::workers(src.pool, src.stale_after),
        status::outbox(src.pool),
        read_db(src),
    );
    let workers = workers.unwrap_or_else(|e| {
        errors.push(format!("workers: {e:#}"));
        Vec::new()
    });
    let outbox = outbox
        .map_err(|e| errors.push(format!("outbox: {e:#}")))
        .ok();
    let (orders, applied, emails) = db_parts.unwrap_or_else(|e| {
        errors.push(format!("{e:#}"));
        Default::default()
    });
    errors.extend(
        queues
            .iter()
            .filter_map(|q| q.error.as_ref().map(|e| format!("{}: {e}", q.handler))),
    );
    Snapshot {
        at: Utc::now(),
        window_secs: src.window.as_secs_f64(),
        orders,
        handlers: combine(&queues, &workers, &applied, src.window),
        workers_live: workers.iter().filter(|w| w.state == "live").count(),
        outbox,
        emails,
        errors,
    }
}

type DbParts = (OrderCounts, BTreeMap<String, i64>, EmailCounts);

async fn read_db(src: &Sources<'_>) -> anyhow::Result<DbParts> {
    use anyhow::Context as _;
    let db = src
        .pool
        .get()
        .await
        .context("cannot connect to PostgreSQL; check DATABASE_URL (locally: `make up`)")?;
    let orders = report::count_orders(&db, src.order_id_prefix).await?;
    let applied = inbox::applied_within(&db, src.window).await?;
    let emails = report::count_emails(&db, src.order_id_prefix).await?;
    Ok((orders, applied, emails))
}

/// One row per handler, in the topology's order: its queues beside what its workers did.
pub fn combine(
    queues: &[QueueStatus],
    workers: &[WorkerStatus],
    applied: &BTreeMap<String, i64>,
    window: Duration,
) -> Vec<HandlerActivity> {
    let secs = window.as_secs_f64().max(f64::MIN_POSITIVE);
    queues
        .iter()
        .map(|q| {
            let applied = applied.get(&q.handler).copied().unwrap_or(0);
            HandlerActivity {
                handler: q.handler.clone(),
                workers: workers
                    .iter()
                    .filter(|w| w.state == "live" && w.handlers.contains(&q.handler))
                    .count(),
                applied,
                per_sec: applied as f64 / secs,
                queue_visible: q.visible,
                queue_in_flight: q.in_flight,
                queue_delayed: q.delayed,
                dlq_depth: q.dlq_depth,
                error: q.error.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(handler: &str, visible: u64, dlq: u64) -> QueueStatus {
        QueueStatus {
            handler: handler.into(),
            queue: format!("p-{handler}"),
            visible: Some(visible),
            in_flight: Some(0),
            delayed: Some(0),
            oldest_age_secs: None,
            dlq: format!("p-{handler}-dlq"),
            dlq_depth: Some(dlq),
            dlq_in_flight: Some(0),
            move_tasks: None,
            move_progress: None,
            error: None,
        }
    }

    fn worker(handlers: &[&str], state: &str) -> WorkerStatus {
        WorkerStatus {
            worker_id: "w".into(),
            handlers: handlers.iter().map(|h| h.to_string()).collect(),
            host: "h".into(),
            pid: 1,
            version: "0".into(),
            started_at: Utc::now(),
            last_seen_at: Utc::now(),
            last_seen_secs_ago: 0,
            processed: 0,
            failed: 0,
            stopped_at: None,
            state: state.into(),
        }
    }

    #[test]
    fn each_handler_gets_its_rate_its_depths_and_only_its_live_workers() {
        let rows = combine(
            &[queue("orders", 3, 0), queue("payments", 0, 2)],
            &[
                worker(&["orders", "payments"], "live"),
                worker(&["orders"], "live"),
                worker(&["payments"], "stale"),
            ],
            &BTreeMap::from([("orders".to_string(), 25)]),
            Duration::from_secs(10),
        );
        assert_eq!(rows[0].handler, "orders");
        assert_eq!((rows[0].workers, rows[0].applied), (2, 25));
        assert!((rows[0].per_sec - 2.5).abs() < 1e-9);
        assert_eq!(rows[0].queue_visible, Some(3));
        assert_eq!(rows[1].handler, "payments");
        assert_eq!((rows[1].workers, rows[1].applied), (1, 0));
        assert_eq!(rows[1].per_sec, 0.0);
        assert_eq!(rows[1].dlq_depth, Some(2));
    }
}
