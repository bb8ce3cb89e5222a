//! The EventBridge bus, the dead-letter queue for events it cannot deliver, and one rule per
//! handler routing the events the handler consumes (per the catalogue) to its queue.

use orderfleet::domain::names::HandlerName;
use orderfleet::infra::topology::{self, Topology};
use serde_json::{json, Value};

use super::queues::queue;
use super::{att, logical_id, r, resource, sub, tags, Handler, Resources, PREFIX};

/// Name of the queue EventBridge dead-letters into: `${Prefix}-bus-dlq`.
pub(super) fn bus_dlq_name() -> String {
    format!("{PREFIX}-bus-dlq")
}

/// The bus and its dead-letter queue.
pub(super) fn shared(res: &mut Resources, names: &Topology) {
    res.add(
        "Bus",
        resource(
            "AWS::Events::EventBus",
            json!({"Name": sub(&names.bus_name), "Tags": tags("bus")}),
        ),
    );
    // Where EventBridge puts events it could not deliver to a queue after its retries.
    res.add(
        "BusDlq",
        queue(json!({
            "QueueName": sub(&bus_dlq_name()),
            "MessageRetentionPeriod": topology::DLQ_RETENTION_SECS,
            "Tags": tags("bus")
        })),
    );
    res.add("BusDlqPolicy", bus_dlq_policy());
}

/// Lets the fleet's rules, and nothing else, dead-letter into the bus DLQ.
fn bus_dlq_policy() -> Value {
    let mut rule_arns: Vec<Value> = HandlerName::ALL
        .iter()
        .map(|h| att(&format!("{}Rule", logical_id(*h)), "Arn"))
        .collect();
    rule_arns.extend(super::partners::rule_arns());
    rule_arns.push(att(super::deliverability::RULE_ID, "Arn"));
    resource(
        "AWS::SQS::QueuePolicy",
        json!({
            "Queues": [r("BusDlq")],
            "PolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [{
                    "Sid": "AllowFleetRulesToDeadLetter",
                    "Effect": "Allow",
                    "Principal": {"Service": "events.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": att("BusDlq", "Arn"),
                    "Condition": {"ArnEquals": {"aws:SourceArn": rule_arns}}
                }]
            }
        }),
    )
}

/// The handler's rule: its catalogue pattern, into its queue, with retries and the bus DLQ.
pub(super) fn handler(res: &mut Resources, h: &Handler) {
    res.add(
        h.id("Rule"),
        resource(
            "AWS::Events::Rule",
            json!({
                "Name": sub(&h.names.rule_name),
                "Description": format!("Routes the events {} consumes (per the catalogue) to its queue", h.name),
                "EventBusName": r("Bus"),
                "EventPattern": h.names.pattern,
                "State": "ENABLED",
                "Targets": [{
                    "Id": "queue",
                    "Arn": att(&h.id("Queue"), "Arn"),
                    "RetryPolicy": {"MaximumRetryAttempts": 185, "MaximumEventAgeInSeconds": 86400},
                    "DeadLetterConfig": {"Arn": att("BusDlq", "Arn")}
                }]
            }),
        ),
    );
}
