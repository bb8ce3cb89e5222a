//! The facts behind `orderfleet status`: every handler's queue and DLQ, their running move
//! tasks, the workers' heartbeats, and the outbox (its backlog and its dead letters).
//!
//! The age of the oldest message is not a queue attribute: SQS publishes it only as the
//! CloudWatch metric `AWS/SQS ApproximateAgeOfOldestMessage` (one-minute resolution, a few
//! minutes late). It is read with one GetMetricData call for all queues, over the last
//! ten minutes; where CloudWatch has no datapoint (the local emulator, a queue idle for a long
//! time, missing permissions) it is `None`, shown as `-`, rather than guessed. Computing it by
//! receiving messages would raise their receive counts and could push work-queue messages into
//! their DLQ.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aws_sdk_cloudwatch::primitives::DateTime as CwDateTime;
use aws_sdk_cloudwatch::types::{Dimension, Metric, MetricDataQuery, MetricStat, ScanBy};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;

use super::native::{self, Native};
use super::queue::{self, Counts};
use crate::domain::names::HandlerName;
use crate::infra::topology::Topology;

/// One handler's queue and DLQ.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub handler: String,
    pub queue: String,
    /// `None` when the queue is missing or unreadable (see `error`).
    pub visible: Option<u64>,
    pub in_flight: Option<u64>,
    pub delayed: Option<u64>,
    /// CloudWatch's ApproximateAgeOfOldestMessage, when it has a recent datapoint.
    pub oldest_age_secs: Option<u64>,
    pub dlq: String,
    pub dlq_depth: Option<u64>,
    pub dlq_in_flight: Option<u64>,
    /// Running move tasks out of the DLQ; `None` where the endpoint has no move tasks.
    pub move_tasks: Option<usize>,
    /// Progress of a running move task: messages moved, of how many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub move_progress: Option<(i64, Option<i64>)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A worker's heartbeat row.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub handlers: Vec<String>,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub last_seen_secs_ago: i64,
    pub processed: i64,
    pub failed: i64,
    pub stopped_at: Option<DateTime<Utc>>,
    /// `live`, `stale` (no heartbeat for longer than the stale threshold) or `stopped`.
    pub state: String,
}

/// The outbox: events not yet published, and events EventBridge will never accept, moved to
/// `outbox_dead_letters` by the relay (see [`crate::store::outbox`]).
#[derive(Debug, Clone, Serialize)]
pub struct OutboxStatus {
    pub pending: i64,
    pub dead_letters: i64,
    /// The reason of the newest dead letter, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reason: Option<String>,
}

/// Reads the outbox's backlog and dead letters.
pub async fn outbox(pool: &Pool) -> Result<OutboxStatus> {
    let client = pool
        .get()
        .await
        .context("cannot connect to PostgreSQL for the outbox; check DATABASE_URL")?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM outbox),
                    (SELECT count(*) FROM outbox_dead_letters),
                    (SELECT reason FROM outbox_dead_letters ORDER BY dead_lettered_at DESC LIMIT 1)",
            &[],
        )
        .await
        .context("reading the outbox (run `orderfleet migrate`?)")?;
    Ok(OutboxStatus {
        pending: row.get(0),
        dead_letters: row.get(1),
        last_reason: row.get(2),
    })
}

/// Reads every handler's queues, CloudWatch ages and move tasks.
pub async fn queues(
    sqs: &aws_sdk_sqs::Client,
    cloudwatch: Option<&aws_sdk_cloudwatch::Client>,
    topo: &Topology,
) -> Vec<QueueStatus> {
    let mut set = tokio::task::JoinSet::new();
    for (i, h) in HandlerName::ALL.into_iter().enumerate() {
        let (sqs, topo) = (sqs.clone(), topo.clone());
        set.spawn(async move { (i, one_handler(&sqs, &topo, h).await) });
    }
    let mut rows: Vec<(usize, QueueStatus)> = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(row) = joined {
            rows.push(row);
        }
    }
    rows.sort_by_key(|(i, _)| *i);
    let mut rows: Vec<QueueStatus> = rows.into_iter().map(|(_, r)| r).collect();
    if let Some(cw) = cloudwatch {
        let names: Vec<String> = rows.iter().map(|r| r.queue.clone()).collect();
        match oldest_ages(cw, &names).await {
            Ok(ages) => {
                for (row, age) in rows.iter_mut().zip(ages) {
                    row.oldest_age_secs = age;
                }
            }
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "no CloudWatch ages"),
        }
    }
    rows
}

async fn one_handler(sqs: &aws_sdk_sqs::Client, topo: &Topology, h: HandlerName) -> QueueStatus {
    let mut row = QueueStatus {
        handler: h.to_string(),
        queue: topo.queue_name(h),
        visible: None,
        in_flight: None,
        delayed: None,
        oldest_age_secs: None,
        dlq: topo.dlq_name(h),
        dlq_depth: None,
        dlq_in_flight: None,
        move_tasks: None,
        move_progress: None,
        error: None,
    };
    let mut errors = Vec::new();
    match read_counts(sqs, &row.queue).await {
        Ok(c) => {
            row.visible = Some(c.visible);
            row.in_flight = Some(c.in_flight);
            row.delayed = Some(c.delayed);
        }
        Err(e) => errors.push(format!("{e:#}")),
    }
    match queue::resolve(sqs, &topo.prefix, &row.dlq, queue::Role::Dlq).await {
        Ok(dlq) => {
            if let Ok(c) = queue::counts(sqs, &dlq.url).await {
                row.dlq_depth = Some(c.visible);
                row.dlq_in_flight = Some(c.in_flight);
            }
            if let Ok(Native::Supported(tasks)) = native::list(sqs, &dlq.arn).await {
                let running: Vec<_> = tasks.iter().filter(|t| t.running()).collect();
                row.move_tasks = Some(running.len());
                row.move_progress = running.first().map(|t| (t.moved, t.to_move));
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }
    if !errors.is_empty() {
        row.error = Some(errors.join("; "));
    }
    row
}

async fn read_counts(sqs: &aws_sdk_sqs::Client, name: &str) -> Result<Counts> {
    let url = crate::sqs::queue::queue_url(sqs, name).await?;
    queue::counts(sqs, &url).await
}

/// ApproximateAgeOfOldestMessage of each queue from CloudWatch (latest datapoint of the last
/// ten minutes), in the order given.
pub async fn oldest_ages(
    cw: &aws_sdk_cloudwatch::Client,
    queue_names: &[String],
) -> Result<Vec<Option<u64>>> {
    let now = Utc::now().timestamp();
    let queries = queue_names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let metric = Metric::builder()
                .namespace("AWS/SQS")
                .metric_name("ApproximateAgeOfOldestMessage")
                .dimensions(Dimension::builder().name("QueueName").value(name).build())
                .build();
            MetricDataQuery::builder()
                .id(format!("q{i}"))
                .metric_stat(
                    MetricStat::builder()
                        .metric(metric)
                        .period(60)
                        .stat("Maximum")
                        .build(),
                )
                .return_data(true)
                .build()
        })
        .collect::<Vec<_>>();
    let out = cw
        .get_metric_data()
        .set_metric_data_queries(Some(queries))
        .start_time(CwDateTime::from_secs(now - 600))
        .end_time(CwDateTime::from_secs(now))
        .scan_by(ScanBy::TimestampDescending)
        .send()
        .await
        .context("CloudWatch GetMetricData")?;
    let mut ages = vec![None; queue_names.len()];
    for r in out.metric_data_results() {
        let Some(i) = r
            .id()
            .and_then(|id| id.strip_prefix('q'))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if let (Some(slot), Some(v)) = (ages.get_mut(i), r.values().first()) {
            *slot = Some(v.max(0.0) as u64);
        }
    }
    Ok(ages)
}

/// Workers seen in the last hour, or not stopped, newest first.
pub async fn workers(pool: &Pool, stale_after: Duration) -> Result<Vec<WorkerStatus>> {
    let client = pool
        .get()
        .await
        .context("cannot connect to PostgreSQL for the workers' heartbeats; check DATABASE_URL")?;
    let rows = client
        .query(
            "SELECT worker_id::text, handlers, host, pid, version, started_at, last_seen_at,
                    processed, failed, stopped_at,
                    extract(epoch FROM now() - last_seen_at)::bigint AS ago
             FROM worker_heartbeats
             WHERE stopped_at IS NULL OR last_seen_at > now() - interval '1 hour'
             ORDER BY last_seen_at DESC",
            &[],
        )
        .await
        .context("reading worker_heartbeats (run `orderfleet migrate`?)")?;
    Ok(rows
        .iter()
        .map(|r| {
            let stopped_at: Option<DateTime<Utc>> = r.get("stopped_at");
            let ago: i64 = r.get("ago");
            let state = if stopped_at.is_some() {
                "stopped"
            } else if ago > stale_after.as_secs() as i64 {
                "stale"
            } else {
                "live"
            };
            WorkerStatus {
                worker_id: r.get(0),
                handlers: r.get("handlers"),
                host: r.get("host"),
                pid: r.get("pid"),
                version: r.get("version"),
                started_at: r.get("started_at"),
                last_seen_at: r.get("last_seen_at"),
                last_seen_secs_ago: ago,
                processed: r.get("processed"),
                failed: r.get("failed"),
                stopped_at,
                state: state.to_string(),
            }
        })
        .collect())
}
