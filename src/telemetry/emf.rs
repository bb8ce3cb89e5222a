//! Metrics out of the process: CloudWatch Embedded Metric Format lines on stdout (CloudWatch
//! Logs turns them into metrics with no API call), and optionally a direct PutMetricData sink,
//! batched to one call per flush interval.
//!
//! Dimensions are bounded: `handler`, and `handler` + `outcome`. Never a message id.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit, StatisticSet};
use deadpool_postgres::Pool;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use crate::domain::outcome::error_chain;
use crate::telemetry::metrics::{Counters, Samples, Snapshot};

/// The CloudWatch namespace of every metric.
pub const NAMESPACE: &str = "orderfleet";

/// The number of rows in `outbox_dead_letters`, without dimensions; the template alarms
/// while it is above zero.
pub const OUTBOX_DEAD_LETTERS: &str = "OutboxDeadLetters";

/// Where metrics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sink {
    /// EMF lines on stdout.
    Emf,
    /// PutMetricData, one call per interval.
    Cloudwatch,
    /// Both.
    Both,
    /// Nowhere.
    None,
}

/// One metric value: a number, or a sample of values.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    Number(f64),
    Samples(Samples),
}

/// One metric of a flush.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub value: Reading,
}

/// All metrics of one dimension set in one flush.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub dimensions: Vec<(&'static str, String)>,
    pub metrics: Vec<Metric>,
}

fn count(name: &'static str, v: u64) -> Metric {
    Metric {
        name,
        unit: "Count",
        value: Reading::Number(v as f64),
    }
}

fn dist(name: &'static str, unit: &'static str, s: Samples) -> Option<Metric> {
    (s.count > 0).then_some(Metric {
        name,
        unit,
        value: Reading::Samples(s),
    })
}

/// The groups of one handler for one interval: `now` minus `before` for counters.
pub fn handler_groups(
    handler: &str,
    now: &Snapshot,
    before: &Snapshot,
    c: &Counters,
) -> Vec<Group> {
    let d = |f: fn(&Snapshot) -> u64| f(now).saturating_sub(f(before));
    let dists = c.take_distributions();
    let mut metrics = vec![
        count("MessagesReceived", d(|s| s.received)),
        count("MessagesSucceeded", d(|s| s.succeeded)),
        count("MessagesRetried", d(|s| s.retried)),
        count("MessagesDeadLettered", d(|s| s.dead_lettered)),
        count("MessagesDuplicate", d(|s| s.duplicates)),
        count("MessagesReleased", d(|s| s.released)),
        count("EmptyReceives", d(|s| s.empty_receives)),
        count("ReceiveErrors", d(|s| s.receive_errors)),
        count("LeaseExtensions", d(|s| s.lease_extensions)),
        count("ExpiredReceipts", d(|s| s.expired_receipts)),
        count("HandlerPanics", d(|s| s.panics)),
        count("HandlerTimeouts", d(|s| s.timeouts)),
        count("InFlight", now.in_flight),
        // The adaptive depth: how many messages the consumer lets be in flight now, and the
        // backlog readings that let it grow (see runtime::adapt).
        count("InFlightTarget", now.in_flight_target),
        count("BacklogReads", d(|s| s.backlog_reads)),
        count("Heartbeat", 1),
    ];
    // Only for handlers that group: the largest group allowed now, and the mean group size.
    if now.group_cap > 0 {
        metrics.push(count("GroupCap", now.group_cap));
        let groups = d(|s| s.groups);
        if groups > 0 {
            metrics.push(Metric {
                name: "MeanGroupSize",
                unit: "Count",
                value: Reading::Number(d(|s| s.grouped_events) as f64 / groups as f64),
            });
        }
    }
    metrics.extend(dist(
        "HandlerDurationMs",
        "Milliseconds",
        dists.handler_duration_ms,
    ));
    metrics.extend(dist("MessageAgeMs", "Milliseconds", dists.message_age_ms));
    metrics.extend(dist("ReceiveCount", "Count", dists.receive_count));
    let mut groups = vec![Group {
        dimensions: vec![("handler", handler.to_string())],
        metrics,
    }];
    for (outcome, n) in [
        ("succeeded", d(|s| s.succeeded)),
        ("retried", d(|s| s.retried)),
        ("dead_lettered", d(|s| s.dead_lettered)),
        ("duplicate", d(|s| s.duplicates)),
    ] {
        groups.push(Group {
            dimensions: vec![
                ("handler", handler.to_string()),
                ("outcome", outcome.into()),
            ],
            metrics: vec![count("Messages", n)],
        });
    }
    groups
}

/// Renders one group as an EMF line (without the newline).
pub fn emf_line(group: &Group, timestamp_ms: i64) -> String {
    let mut root = Map::new();
    let names: Vec<&str> = group.dimensions.iter().map(|(k, _)| *k).collect();
    let directives: Vec<Value> = group
        .metrics
        .iter()
        .map(|m| json!({"Name": m.name, "Unit": m.unit}))
        .collect();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [names],
                "Metrics": directives,
            }]
        }),
    );
    for (k, v) in &group.dimensions {
        root.insert((*k).into(), Value::String(v.clone()));
    }
    for m in &group.metrics {
        let v = match &m.value {
            Reading::Number(n) => json!(n),
            Reading::Samples(s) => json!(s.values),
        };
        root.insert(m.name.into(), v);
    }
    Value::Object(root).to_string()
}

fn datums(group: &Group, at: aws_sdk_cloudwatch::primitives::DateTime) -> Vec<MetricDatum> {
    let dims: Vec<Dimension> = group
        .dimensions
        .iter()
        .map(|(k, v)| Dimension::builder().name(*k).value(v).build())
        .collect();
    group
        .metrics
        .iter()
        .map(|m| {
            let b = MetricDatum::builder()
                .metric_name(m.name)
                .set_dimensions(Some(dims.clone()))
                .unit(StandardUnit::from(m.unit))
                .timestamp(at);
            match &m.value {
                Reading::Number(n) => b.value(*n).build(),
                Reading::Samples(s) => b
                    .statistic_values(
                        StatisticSet::builder()
                            .sample_count(s.count as f64)
                            .sum(s.sum)
                            .minimum(s.min)
                            .maximum(s.max)
                            .build(),
                    )
                    .build(),
            }
        })
        .collect()
}

/// Flushes the counters of every consumer of this process each interval.
pub struct Reporter {
    pub sink: Sink,
    pub interval: Duration,
    pub consumers: Vec<(String, Arc<Counters>)>,
    pub cloudwatch: Option<aws_sdk_cloudwatch::Client>,
    pub pool: Pool,
    /// Whether this process reports the outbox's lag and dead letters: only a process that
    /// relays does (the others' database roles may not read the outbox, migration 0015).
    pub outbox: bool,
}

impl Reporter {
    /// Runs until `stop`, then flushes once more so the last interval is not lost.
    pub async fn run(self, stop: CancellationToken) {
        if self.sink == Sink::None {
            return;
        }
        let mut last: HashMap<String, Snapshot> = HashMap::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tick.tick() => false,
            };
            self.flush(&mut last).await;
            if stopping {
                return;
            }
        }
    }

    /// The outbox's lag (age of its oldest unpublished row) and the number of rows in its
    /// dead letters (events EventBridge will never accept; alarmed on while above zero).
    async fn outbox_readings(&self) -> Option<(f64, i64)> {
        let client = self.pool.get().await.ok()?;
        let row = client
            .query_one(
                "SELECT (SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)) * 1000, 0)::float8
                           FROM outbox WHERE published_at IS NULL),
                        (SELECT count(*) FROM outbox_dead_letters)",
                &[],
            )
            .await
            .ok()?;
        Some((row.get(0), row.get(1)))
    }

    async fn flush(&self, last: &mut HashMap<String, Snapshot>) {
        let mut groups = Vec::new();
        for (name, c) in &self.consumers {
            let now = c.snapshot();
            let before = last.insert(name.clone(), now).unwrap_or_default();
            groups.extend(handler_groups(name, &now, &before, c));
        }
        let readings = match self.outbox {
            true => self.outbox_readings().await,
            false => None,
        };
        if let Some((lag, dead_letters)) = readings {
            groups.push(Group {
                dimensions: vec![],
                metrics: vec![
                    Metric {
                        name: "OutboxLagMs",
                        unit: "Milliseconds",
                        value: Reading::Number(lag),
                    },
                    count(OUTBOX_DEAD_LETTERS, dead_letters.max(0) as u64),
                ],
            });
        }
        let now = chrono::Utc::now();
        if matches!(self.sink, Sink::Emf | Sink::Both) {
            let mut out = std::io::stdout().lock();
            for g in &groups {
                let _ = writeln!(out, "{}", emf_line(g, now.timestamp_millis()));
            }
            let _ = out.flush();
        }
        if let (Some(cw), true) = (
            &self.cloudwatch,
            matches!(self.sink, Sink::Cloudwatch | Sink::Both),
        ) {
            let at = aws_sdk_cloudwatch::primitives::DateTime::from_millis(now.timestamp_millis());
            let all: Vec<MetricDatum> = groups.iter().flat_map(|g| datums(g, at)).collect();
            // 1000 datums per call is the API's limit; a fleet process stays far below it, so
            // this is one call per interval in practice.
            for chunk in all.chunks(1000) {
                if let Err(e) = cw
                    .put_metric_data()
                    .namespace(NAMESPACE)
                    .set_metric_data(Some(chunk.to_vec()))
                    .send()
                    .await
                {
                    tracing::warn!(error = %error_chain(&e), "PutMetricData failed; this interval's metrics are lost");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emf_line_declares_every_metric_it_carries() {
        let c = Counters::default();
        c.observe(12.0, Some(40.0), 1);
        let now = Snapshot {
            received: 3,
            succeeded: 2,
            in_flight_target: 40,
            group_cap: 20,
            groups: 2,
            grouped_events: 3,
            ..Default::default()
        };
        let groups = handler_groups("orders", &now, &Snapshot::default(), &c);
        let line: Value = serde_json::from_str(&emf_line(&groups[0], 1)).unwrap();
        assert_eq!(line["handler"], "orders");
        assert_eq!(line["MessagesReceived"], 3.0);
        assert_eq!(line["InFlightTarget"], 40.0);
        assert_eq!(line["GroupCap"], 20.0);
        assert_eq!(line["MeanGroupSize"], 1.5);
        assert_eq!(line["HandlerDurationMs"], json!([12.0]));
        let declared = line["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap();
        for d in declared {
            assert!(line.get(d["Name"].as_str().unwrap()).is_some());
        }
    }
}
