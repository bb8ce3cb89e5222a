//! The stack's outputs: what operators and other stacks look up after a deploy.

use serde_json::{json, Value};

use super::{att, r, sub};

pub(super) fn outputs() -> Value {
    json!({
        "BusName": {"Description": "EventBridge bus the storefront publishes to", "Value": r("Bus")},
        "BusArn": {"Value": att("Bus", "Arn")},
        "ClusterName": {"Value": r("Cluster")},
        "LogGroupName": {"Value": r("LogGroup")},
        "DatabaseUrlSecretArn": {"Description": "Secret holding the master DATABASE_URL (for orderfleet migrate; workers have their own)", "Value": r("DatabaseUrlSecret")},
        "DatabaseEndpoint": {"Value": att("Db", "Endpoint.Address")},
        "LakeBucketName": {"Value": r("LakeBucket")},
        "LakeDeliveryStreamName": {"Value": r("LakeDeliveryStream")},
        "AlarmTopicArn": {"Value": r("AlarmTopic")},
        "DashboardUrl": {"Value": sub("https://${AWS::Region}.console.aws.amazon.com/cloudwatch/home?region=${AWS::Region}#dashboards:name=${Dashboard}")}
    })
}
