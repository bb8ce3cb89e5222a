//! The alarm topic (with an optional email subscription) and the CloudWatch alarms: the bus DLQ
//! and the outbox dead letters, then per handler its DLQ, its oldest message, its error rate and
//! its heartbeat. Every alarm notifies the topic when it fires and when it clears.

use orderfleet::domain::names::HandlerName;
use orderfleet::infra::topology::Topology;
use serde_json::{json, Value};

use super::bus::bus_dlq_name;
use super::{r, resource, sub, tags, Handler, Resources, METRICS_NAMESPACE, PREFIX};

const RUNBOOK: &str = "Runbook: docs/deploy.md#alarms";

// Alarm names: a DLQ's alarm and a work queue's three are `<queue name>-<what>`.

fn dlq_not_empty(dlq: &str) -> String {
    format!("{dlq}-not-empty")
}
fn oldest_message_age(queue: &str) -> String {
    format!("{queue}-oldest-message-age")
}
fn error_rate(queue: &str) -> String {
    format!("{queue}-error-rate")
}
fn heartbeat_missing(queue: &str) -> String {
    format!("{queue}-heartbeat-missing")
}
fn outbox_dead_letters() -> String {
    format!("{PREFIX}-outbox-dead-letters")
}

/// Every alarm's name, shared ones first, then each handler's.
pub(super) fn all_names(names: &Topology) -> Vec<String> {
    let mut alarms = vec![dlq_not_empty(&bus_dlq_name()), outbox_dead_letters()];
    for h in HandlerName::ALL {
        let queue = names.queue_name(h);
        alarms.push(dlq_not_empty(&names.dlq_name(h)));
        alarms.push(oldest_message_age(&queue));
        alarms.push(error_rate(&queue));
        alarms.push(heartbeat_missing(&queue));
    }
    alarms
}

/// A CloudWatch alarm that notifies the alarm topic.
fn alarm(mut properties: Value) -> Value {
    properties["AlarmActions"] = json!([r("AlarmTopic")]);
    properties["OKActions"] = json!([r("AlarmTopic")]);
    resource("AWS::CloudWatch::Alarm", properties)
}

/// The topic, its subscription, and the alarms not owned by one handler.
pub(super) fn shared(res: &mut Resources) {
    res.add(
        "AlarmTopic",
        resource(
            "AWS::SNS::Topic",
            json!({"TopicName": sub("${Prefix}-alarms"), "Tags": tags("alarms")}),
        ),
    );
    res.add(
        "AlarmEmailSubscription",
        json!({
            "Type": "AWS::SNS::Subscription",
            "Condition": "HasAlarmEmail",
            "Properties": {"TopicArn": r("AlarmTopic"), "Protocol": "email", "Endpoint": r("AlarmEmail")}
        }),
    );
    res.add("BusDlqAlarm", dlq_alarm(&bus_dlq_name(), "bus"));
    res.add("OutboxDeadLettersAlarm", outbox_dead_letters_alarm());
}

/// The outbox's dead letters live in PostgreSQL; the workers report their count.
fn outbox_dead_letters_alarm() -> Value {
    alarm(json!({
        "AlarmName": sub(&outbox_dead_letters()),
        "AlarmDescription": format!("Events wait in the outbox dead letters (table outbox_dead_letters): EventBridge will never accept them as they are. Run `orderfleet status`, read the reasons, fix and re-insert them into the outbox, or delete them. {RUNBOOK}"),
        "Namespace": METRICS_NAMESPACE,
        "MetricName": orderfleet::telemetry::emf::OUTBOX_DEAD_LETTERS,
        "Statistic": "Maximum",
        "Period": 60,
        "EvaluationPeriods": 1,
        "Threshold": 0,
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching"
    }))
}

/// Fires as soon as a message waits in the dead-letter queue `dlq` (of `what`).
fn dlq_alarm(dlq: &str, what: &str) -> Value {
    alarm(json!({
        "AlarmName": sub(&dlq_not_empty(dlq)),
        "AlarmDescription": format!("Messages wait in the {what} dead-letter queue: inspect, fix the cause, then redrive. {RUNBOOK}"),
        "Namespace": "AWS/SQS",
        "MetricName": "ApproximateNumberOfMessagesVisible",
        "Dimensions": [{"Name": "QueueName", "Value": sub(dlq)}],
        "Statistic": "Maximum",
        "Period": 60,
        "EvaluationPeriods": 1,
        "Threshold": 0,
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching"
    }))
}

/// The handler's four alarms.
pub(super) fn handler(res: &mut Resources, h: &Handler) {
    res.add(h.id("DlqAlarm"), dlq_alarm(&h.names.dlq_name, h.name));
    res.add(h.id("OldestMessageAlarm"), oldest_message_alarm(h));
    res.add(h.id("ErrorRateAlarm"), error_rate_alarm(h));
    res.add(h.id("HeartbeatAlarm"), heartbeat_alarm(h));
}

fn oldest_message_alarm(h: &Handler) -> Value {
    let queue = &h.names.queue_name;
    alarm(json!({
        "AlarmName": sub(&oldest_message_age(queue)),
        "AlarmDescription": format!("The oldest message on the {} queue waits longer than OldestMessageAgeThresholdSecs: the handler is down, stuck or too slow. {RUNBOOK}", h.name),
        "Namespace": "AWS/SQS",
        "MetricName": "ApproximateAgeOfOldestMessage",
        "Dimensions": [{"Name": "QueueName", "Value": sub(queue)}],
        "Statistic": "Maximum",
        "Period": 60,
        "EvaluationPeriods": 5,
        "DatapointsToAlarm": 5,
        "Threshold": r("OldestMessageAgeThresholdSecs"),
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching"
    }))
}

/// (retried + dead-lettered) / received over 5 minutes, from the worker's own metrics.
fn error_rate_alarm(h: &Handler) -> Value {
    let metric = |id: &str, metric: &str| {
        json!({
            "Id": id,
            "MetricStat": {
                "Metric": {
                    "Namespace": METRICS_NAMESPACE,
                    "MetricName": metric,
                    "Dimensions": [{"Name": "handler", "Value": h.name}]
                },
                "Period": 300,
                "Stat": "Sum"
            },
            "ReturnData": false
        })
    };
    alarm(json!({
        "AlarmName": sub(&error_rate(&h.names.queue_name)),
        "AlarmDescription": format!("More than ErrorRateThresholdPercent of the {} handler's messages were retried or dead-lettered in 5 minutes. {RUNBOOK}", h.name),
        "Metrics": [
            metric("received", "MessagesReceived"),
            metric("retried", "MessagesRetried"),
            metric("dead", "MessagesDeadLettered"),
            {
                "Id": "error_rate",
                "Expression": "IF(received > 0, 100 * (FILL(retried, 0) + FILL(dead, 0)) / received, 0)",
                "Label": "Retried or dead-lettered (% of received)",
                "ReturnData": true
            }
        ],
        "EvaluationPeriods": 3,
        "DatapointsToAlarm": 2,
        "Threshold": r("ErrorRateThresholdPercent"),
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching"
    }))
}

/// Fires when no worker of the handler reports: missing data is breaching.
fn heartbeat_alarm(h: &Handler) -> Value {
    alarm(json!({
        "AlarmName": sub(&heartbeat_missing(&h.names.queue_name)),
        "AlarmDescription": format!("No {} worker reported its Heartbeat metric for 3 minutes: none is running, or all are wedged. {RUNBOOK}", h.name),
        "Namespace": METRICS_NAMESPACE,
        "MetricName": "Heartbeat",
        "Dimensions": [{"Name": "handler", "Value": h.name}],
        "Statistic": "Sum",
        "Period": 60,
        "EvaluationPeriods": 3,
        "DatapointsToAlarm": 3,
        "Threshold": 1,
        "ComparisonOperator": "LessThanThreshold",
        "TreatMissingData": "breaching"
    }))
}
