//! The template's parameters, in the groups the CloudFormation console shows them in
//! (`AWS::CloudFormation::Interface`). Each group lists its parameters once, in display order.

use orderfleet::infra::topology::Topology;
use serde_json::{json, Value};

/// One group of parameters in the console: its label and its parameters, in order.
pub(super) struct Group {
    label: &'static str,
    parameters: Vec<(&'static str, Value)>,
}

/// Every parameter, grouped; `topo`'s prefix is the default of `Prefix`.
pub(super) fn groups(topo: &Topology) -> Vec<Group> {
    let group = |label, parameters| Group { label, parameters };
    vec![
        group("Environment", environment(topo)),
        group("Network", network()),
        group("Workers", workers()),
        group("Database", database()),
        group("Email, lake, personalization", {
            let mut p = email_lake_personalization();
            p.extend(super::deliverability::parameters());
            p
        }),
        group("Commerce platforms", {
            let mut p = super::partners::parameters();
            p.extend(super::partners::write_back_parameters());
            p
        }),
        group("Alarms", alarms()),
    ]
}

/// The `ParameterGroups` of the console interface.
pub(super) fn interface(groups: &[Group]) -> Value {
    groups
        .iter()
        .map(|g| {
            let names: Vec<&str> = g.parameters.iter().map(|(name, _)| *name).collect();
            json!({"Label": {"default": g.label}, "Parameters": names})
        })
        .collect()
}

/// The template's `Parameters` section.
pub(super) fn parameters(groups: Vec<Group>) -> Value {
    groups
        .into_iter()
        .flat_map(|g| g.parameters)
        .map(|(name, parameter)| (name.to_string(), parameter))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn environment(topo: &Topology) -> Vec<(&'static str, Value)> {
    vec![
        (
            "EnvironmentName",
            json!({
                "Type": "String", "Default": "production", "AllowedPattern": "^[a-z][a-z0-9-]{0,31}$",
                "Description": "Environment name, used in tags and the log group name (e.g. production, staging)."
            }),
        ),
        (
            "Prefix",
            json!({
                "Type": "String", "Default": topo.prefix, "AllowedPattern": "^[a-z][a-z0-9-]{0,39}$",
                "Description": "Prefix of every resource name: bus <Prefix>, queues <Prefix>-<handler>, DLQs <Prefix>-<handler>-dlq. Workers get it as ORDERFLEET_PREFIX."
            }),
        ),
        (
            "ImageUri",
            json!({
                "Type": "String", "AllowedPattern": "^\\S+$",
                "Description": "Container image with orderfleet-worker and orderfleet (deploy/docker/Dockerfile), e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/orderfleet:1.0.0."
            }),
        ),
        (
            "CpuArchitecture",
            json!({
                "Type": "String", "Default": "X86_64", "AllowedValues": ["X86_64", "ARM64"],
                "Description": "CPU architecture the image was built for."
            }),
        ),
    ]
}

fn network() -> Vec<(&'static str, Value)> {
    vec![
        (
            "VpcId",
            json!({"Type": "AWS::EC2::VPC::Id", "Description": "VPC of the tasks and the database."}),
        ),
        (
            "SubnetIds",
            json!({
                "Type": "List<AWS::EC2::Subnet::Id>",
                "Description": "Private subnets in at least two Availability Zones, with a route to the AWS APIs (NAT gateway or VPC endpoints)."
            }),
        ),
        (
            "AssignPublicIp",
            json!({
                "Type": "String", "Default": "DISABLED", "AllowedValues": ["DISABLED", "ENABLED"],
                "Description": "ENABLED only when SubnetIds are public subnets without NAT."
            }),
        ),
    ]
}

fn workers() -> Vec<(&'static str, Value)> {
    vec![
        (
            "TaskCpu",
            json!({
                "Type": "String", "Default": "256", "AllowedValues": ["256", "512", "1024", "2048", "4096"],
                "Description": "Fargate task CPU units per handler task."
            }),
        ),
        (
            "TaskMemory",
            json!({
                "Type": "String", "Default": "512", "AllowedValues": ["512", "1024", "2048", "3072", "4096", "8192"],
                "Description": "Fargate task memory (MiB) per handler task; must be valid for TaskCpu."
            }),
        ),
        (
            "DesiredCount",
            json!({
                "Type": "Number", "Default": 1, "MinValue": 0,
                "Description": "Tasks per handler when its service is created; autoscaling then keeps it between MinCount and MaxCount."
            }),
        ),
        (
            "MinCount",
            json!({"Type": "Number", "Default": 1, "MinValue": 0, "Description": "Fewest tasks per handler."}),
        ),
        (
            "MaxCount",
            json!({"Type": "Number", "Default": 4, "MinValue": 1, "Description": "Most tasks per handler."}),
        ),
        (
            "BacklogPerTaskTarget",
            json!({
                "Type": "Number", "Default": 100, "MinValue": 1,
                "Description": "Target tracking keeps visible messages per running task near this value."
            }),
        ),
        (
            "LogRetentionDays",
            json!({
                "Type": "Number", "Default": 30,
                "AllowedValues": [1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653],
                "Description": "Retention of the workers' log group."
            }),
        ),
    ]
}

fn database() -> Vec<(&'static str, Value)> {
    vec![
        (
            "DbInstanceClass",
            json!({"Type": "String", "Default": "db.t4g.medium", "Description": "RDS instance class."}),
        ),
        (
            "DbAllocatedStorageGiB",
            json!({"Type": "Number", "Default": 20, "MinValue": 20, "MaxValue": 65536, "Description": "RDS storage (GiB, gp3)."}),
        ),
        (
            "DbMultiAz",
            json!({"Type": "String", "Default": "true", "AllowedValues": ["true", "false"], "Description": "Run a standby in a second Availability Zone."}),
        ),
        (
            "DbForceSsl",
            json!({
                "Type": "String", "Default": "1", "AllowedValues": ["0", "1"],
                "Description": "rds.force_ssl. The workers connect with sslmode=require and verify the server against the RDS CA bundle in their image (PGSSLROOTCERT)."
            }),
        ),
    ]
}

fn email_lake_personalization() -> Vec<(&'static str, Value)> {
    vec![
        (
            "SesIdentity",
            json!({
                "Type": "String", "AllowedPattern": "^\\S+$",
                "Description": "Verified SES identity (domain or address) the notifications handler may send from."
            }),
        ),
        (
            "EmailFromAddress",
            json!({
                "Type": "String", "AllowedPattern": "^\\S+@\\S+$",
                "Description": "From address of customer emails; must belong to SesIdentity."
            }),
        ),
        (
            "LakeArchiveAfterDays",
            json!({"Type": "Number", "Default": 90, "MinValue": 1, "Description": "Lake objects move to S3 Glacier Instant Retrieval after this many days."}),
        ),
        (
            "LakeExpireAfterDays",
            json!({"Type": "Number", "Default": 1825, "MinValue": 2, "Description": "Lake objects are deleted after this many days (more than LakeArchiveAfterDays)."}),
        ),
        (
            "PersonalizeTrackingId",
            json!({"Type": "String", "Default": "", "Description": "Amazon Personalize event tracker id; empty disables forwarding."}),
        ),
        (
            "PersonalizeEventTrackerArn",
            json!({"Type": "String", "Default": "", "Description": "ARN of that event tracker, to scope personalize:PutEvents; empty grants nothing."}),
        ),
    ]
}

fn alarms() -> Vec<(&'static str, Value)> {
    vec![
        (
            "AlarmEmail",
            json!({"Type": "String", "Default": "", "Description": "Address subscribed to the alarm topic; empty for none."}),
        ),
        (
            "OldestMessageAgeThresholdSecs",
            json!({
                "Type": "Number", "Default": 300, "MinValue": 60,
                "Description": "Alarm when a queue's oldest message is older than this."
            }),
        ),
        (
            "ErrorRateThresholdPercent",
            json!({
                "Type": "Number", "Default": 5, "MinValue": 1, "MaxValue": 100,
                "Description": "Alarm when (retried + dead-lettered) / received exceeds this percentage over 5 minutes."
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_is_in_exactly_one_group() {
        let groups = groups(&Topology::default());
        let listed: usize = groups.iter().map(|g| g.parameters.len()).sum();
        let parameters = parameters(groups);
        assert_eq!(parameters.as_object().map(|p| p.len()), Some(listed));
    }
}
