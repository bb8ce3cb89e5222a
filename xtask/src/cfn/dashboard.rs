//! The fleet's CloudWatch dashboard: every alarm on top, then a grid of graphs, one per
//! concern, with one line per handler.

use orderfleet::domain::names::HandlerName;
use orderfleet::infra::topology::Topology;
use serde_json::{json, Value};

use super::{alarms, resource, sub, Resources, METRICS_NAMESPACE, PREFIX};

/// Height of every widget, and width of the graphs (three to a row of 24).
const HEIGHT: usize = 6;
const GRAPH_WIDTH: usize = 8;

pub(super) fn shared(res: &mut Resources, names: &Topology) {
    let mut widgets = vec![alarm_widget(names)];
    for (i, (title, metrics)) in graphs(names).into_iter().enumerate() {
        widgets.push(graph_widget(i, title, metrics));
    }
    let body = json!({"widgets": widgets}).to_string();
    res.add(
        "Dashboard",
        resource(
            "AWS::CloudWatch::Dashboard",
            json!({
                "DashboardName": sub("${Prefix}-${EnvironmentName}"),
                "DashboardBody": sub(&body)
            }),
        ),
    );
}

/// The state of every alarm, across the top.
fn alarm_widget(names: &Topology) -> Value {
    let arns: Vec<String> = alarms::all_names(names)
        .into_iter()
        .map(|name| {
            format!("arn:${{AWS::Partition}}:cloudwatch:${{AWS::Region}}:${{AWS::AccountId}}:alarm:{name}")
        })
        .collect();
    json!({
        "type": "alarm", "x": 0, "y": 0, "width": 24, "height": HEIGHT,
        "properties": {"title": "Alarms", "alarms": arns, "sortBy": "stateUpdatedTimestamp"}
    })
}

/// The `i`th graph, placed below the alarms three to a row.
fn graph_widget(i: usize, title: &str, metrics: Vec<Value>) -> Value {
    json!({
        "type": "metric",
        "x": (i % 3) * GRAPH_WIDTH, "y": HEIGHT + (i / 3) * HEIGHT, "width": GRAPH_WIDTH, "height": HEIGHT,
        "properties": {
            "title": title, "view": "timeSeries", "stacked": false,
            "region": "${AWS::Region}", "period": 60, "metrics": metrics
        }
    })
}

/// Every graph's title and lines, in order.
fn graphs(names: &Topology) -> Vec<(&'static str, Vec<Value>)> {
    let visible = "ApproximateNumberOfMessagesVisible";
    vec![
        ("Messages received", fleet("MessagesReceived", "Sum")),
        ("Messages succeeded", fleet("MessagesSucceeded", "Sum")),
        ("Messages retried", fleet("MessagesRetried", "Sum")),
        (
            "Messages dead-lettered",
            fleet("MessagesDeadLettered", "Sum"),
        ),
        ("Duplicates skipped", fleet("MessagesDuplicate", "Sum")),
        (
            "Handler duration p99 (ms)",
            fleet("HandlerDurationMs", "p99"),
        ),
        (
            "Message age at receive p99 (ms)",
            fleet("MessageAgeMs", "p99"),
        ),
        ("Receive count max", fleet("ReceiveCount", "Maximum")),
        (
            "Queue backlog (visible)",
            sqs(visible, |h| names.queue_name(h)),
        ),
        (
            "Oldest message (s)",
            sqs("ApproximateAgeOfOldestMessage", |h| names.queue_name(h)),
        ),
        ("DLQ depth", sqs(visible, |h| names.dlq_name(h))),
        ("Running tasks", running_tasks(names)),
        ("In flight", fleet("InFlight", "Maximum")),
        ("Outbox lag max (ms)", fleet("OutboxLagMs", "Maximum")),
        ("Lease extensions", fleet("LeaseExtensions", "Sum")),
        ("Empty receives", fleet("EmptyReceives", "Sum")),
        ("Heartbeats", fleet("Heartbeat", "Sum")),
    ]
}

/// One of the worker's own metrics, a line per handler.
fn fleet(metric: &str, stat: &str) -> Vec<Value> {
    HandlerName::ALL
        .iter()
        .map(|h| {
            let h = h.as_str();
            json!([METRICS_NAMESPACE, metric, "handler", h, {"stat": stat, "label": h}])
        })
        .collect()
}

/// An SQS metric (maximum) of each handler's queue named by `queue`.
fn sqs(metric: &str, queue: impl Fn(HandlerName) -> String) -> Vec<Value> {
    HandlerName::ALL
        .iter()
        .map(|h| {
            let label = h.as_str();
            json!(["AWS/SQS", metric, "QueueName", queue(*h), {"stat": "Maximum", "label": label}])
        })
        .collect()
}

/// Container Insights' running tasks of each handler's service.
fn running_tasks(names: &Topology) -> Vec<Value> {
    HandlerName::ALL
        .iter()
        .map(|h| {
            json!(["ECS/ContainerInsights", "RunningTaskCount", "ClusterName", PREFIX,
                   "ServiceName", names.queue_name(*h), {"stat": "Average", "label": h.as_str()}])
        })
        .collect()
}
