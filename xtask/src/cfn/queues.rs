//! Each handler's SQS queue and dead-letter queue, and the queue policy that lets only the
//! handler's rule send to it. Redrive settings and policies are the topology's own.

use orderfleet::domain::names::HandlerName;
use orderfleet::infra::topology::{self, Topology};
use serde_json::{json, Value};

use super::{
    att, r, resource, resource_on_removal, splice, sqs_arn, sub, tags, Handler, Resources,
};

// Marker ARNs handed to the topology's policy functions, then replaced by intrinsics.
const QUEUE_ARN_MARK: &str = "@@queue-arn@@";
const DLQ_ARN_MARK: &str = "@@dlq-arn@@";
const RULE_ARN_MARK: &str = "@@rule-arn@@";

/// An SQS queue with `properties`, encrypted with SQS-managed keys.
pub(super) fn queue(mut properties: Value) -> Value {
    properties["SqsManagedSseEnabled"] = json!(true);
    // The names are the contract with the workers: a re-created stack must be able to create
    // them again, so nothing is retained. Redrive or archive DLQs before deleting.
    resource_on_removal("AWS::SQS::Queue", "Delete", properties)
}

/// The handler's queue, DLQ and queue policy.
pub(super) fn handler(res: &mut Resources, names: &Topology, h: &Handler) {
    dlq(res, h);
    work_queue(res, names, h);
    queue_policy(res, h);
}

/// The DLQ, which accepts dead letters from the handler's own queue only.
fn dlq(res: &mut Resources, h: &Handler) {
    res.add(
        h.id("Dlq"),
        queue(json!({
            "QueueName": sub(&h.names.dlq_name),
            "MessageRetentionPeriod": topology::DLQ_RETENTION_SECS,
            // The queue's ARN is built, not read: GetAtt would make queue and DLQ depend on each
            // other.
            "RedriveAllowPolicy": splice(
                &topology::redrive_allow_policy(QUEUE_ARN_MARK),
                &[(QUEUE_ARN_MARK, sqs_arn(&h.names.queue_name))],
            ),
            "Tags": tags(h.name)
        })),
    );
}

/// The queue the handler consumes, redriving to its DLQ after `max_receive_count` receives.
fn work_queue(res: &mut Resources, names: &Topology, h: &Handler) {
    res.add(
        h.id("Queue"),
        queue(json!({
            "QueueName": sub(&h.names.queue_name),
            "VisibilityTimeout": topology::QUEUE_VISIBILITY_TIMEOUT_SECS,
            "MessageRetentionPeriod": topology::QUEUE_RETENTION_SECS,
            "RedrivePolicy": splice(
                &names.redrive_policy(DLQ_ARN_MARK),
                &[(DLQ_ARN_MARK, att(&h.id("Dlq"), "Arn"))],
            ),
            "Tags": tags(h.name)
        })),
    );
}

/// Lets the handler's rule send, and for the storefront the connected platforms' rules, for
/// notifications the SES events' rule on the default bus.
fn queue_policy(res: &mut Resources, h: &Handler) {
    let (queue, rule) = (h.id("Queue"), h.id("Rule"));
    let mut rules = vec![att(&rule, "Arn")];
    if h.handler == HandlerName::Storefront {
        rules.extend(super::partners::rule_arns());
    }
    if h.handler == HandlerName::Notifications {
        rules.push(att(super::deliverability::RULE_ID, "Arn"));
    }
    let marks: Vec<String> = (0..rules.len())
        .map(|i| format!("{RULE_ARN_MARK}{i}"))
        .collect();
    let mark_refs: Vec<&str> = marks.iter().map(String::as_str).collect();
    let mut replacements = vec![(QUEUE_ARN_MARK, att(&queue, "Arn"))];
    replacements.extend(mark_refs.iter().copied().zip(rules));
    res.add(
        h.id("QueuePolicy"),
        resource(
            "AWS::SQS::QueuePolicy",
            json!({
                "Queues": [r(&queue)],
                "PolicyDocument": splice(
                    &topology::queue_policy(QUEUE_ARN_MARK, &mark_refs),
                    &replacements,
                )
            }),
        ),
    );
}
