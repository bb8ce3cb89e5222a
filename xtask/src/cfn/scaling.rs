//! Autoscaling of each handler's service: target tracking on visible messages per running
//! task (the queue's backlog divided by Container Insights' running task count).

use serde_json::{json, Value};

use super::{att, r, resource, sub, Handler, Resources};

/// The handler's scalable target (`MinCount`..`MaxCount` tasks) and its scaling policy.
pub(super) fn handler(res: &mut Resources, h: &Handler) {
    let service = h.id("Service");
    res.add(
        h.id("ScalableTarget"),
        resource(
            "AWS::ApplicationAutoScaling::ScalableTarget",
            json!({
                "ServiceNamespace": "ecs",
                "ScalableDimension": "ecs:service:DesiredCount",
                "ResourceId": sub(&format!("service/${{Cluster}}/${{{service}.Name}}")),
                "MinCapacity": r("MinCount"),
                "MaxCapacity": r("MaxCount")
            }),
        ),
    );
    res.add(
        h.id("ScalingPolicy"),
        resource(
            "AWS::ApplicationAutoScaling::ScalingPolicy",
            json!({
                "PolicyName": format!("{}-backlog-per-task", h.name),
                "PolicyType": "TargetTrackingScaling",
                "ScalingTargetId": r(&h.id("ScalableTarget")),
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": r("BacklogPerTaskTarget"),
                    "ScaleOutCooldown": 60,
                    "ScaleInCooldown": 300,
                    "CustomizedMetricSpecification": {"Metrics": backlog_per_task(h)}
                }
            }),
        ),
    );
}

/// The metric math: the queue's visible messages over the service's running tasks.
fn backlog_per_task(h: &Handler) -> Value {
    json!([
        {
            "Id": "backlog",
            "MetricStat": {
                "Metric": {
                    "Namespace": "AWS/SQS",
                    "MetricName": "ApproximateNumberOfMessagesVisible",
                    "Dimensions": [{"Name": "QueueName", "Value": att(&h.id("Queue"), "QueueName")}]
                },
                "Stat": "Sum"
            },
            "ReturnData": false
        },
        {
            "Id": "tasks",
            "MetricStat": {
                "Metric": {
                    "Namespace": "ECS/ContainerInsights",
                    "MetricName": "RunningTaskCount",
                    "Dimensions": [
                        {"Name": "ClusterName", "Value": r("Cluster")},
                        {"Name": "ServiceName", "Value": att(&h.id("Service"), "Name")}
                    ]
                },
                "Stat": "Average"
            },
            "ReturnData": false
        },
        {
            // With no task running, the whole backlog is the per-task backlog.
            "Id": "backlog_per_task",
            "Expression": "backlog / IF(tasks > 0, tasks, 1)",
            "Label": "Visible messages per running task",
            "ReturnData": true
        }
    ])
}
