//! Email deliverability: the SES configuration set the notifications worker sends with, its
//! event destination to the account's default EventBridge bus (bounces and complaints; SES
//! supports only the default bus there), the rule on that bus into the notifications queue
//! ([`Topology::ses_rule`], the same pattern `orderfleet provision` puts), the key of the
//! suppression list's address hashes, and the unsubscribe settings of marketing email.

use orderfleet::domain::names::HandlerName;
use orderfleet::infra::topology::Topology;
use serde_json::{json, Value};

use super::{att, r, resource, resource_on_removal, sub, tags, Resources, PREFIX};

/// Logical id of the rule on the default bus.
pub(super) const RULE_ID: &str = "SesEventsRule";
/// Logical id of the configuration set.
pub(super) const CONFIGURATION_SET_ID: &str = "SesConfigurationSet";
/// Logical id of the suppression list's key.
pub(super) const HASH_KEY_ID: &str = "EmailHashKeySecret";

/// The parameters: the shop's unsubscribe page and the secret its tokens are signed with.
pub(super) fn parameters() -> Vec<(&'static str, Value)> {
    vec![
        (
            "UnsubscribeUrl",
            json!({
                "Type": "String", "Default": "", "AllowedPattern": "^$|^https://\\S+$",
                "Description": "The shop's unsubscribe page (https): marketing emails link to it with a signed token and name it in List-Unsubscribe. Empty: no marketing email is sent."
            }),
        ),
        (
            "UnsubscribeKeySecretArn",
            json!({
                "Type": "String", "Default": "",
                "Description": "ARN of a Secrets Manager secret holding the key (32 bytes or more) the unsubscribe tokens are signed with, shared with the shop's unsubscribe page. Required with UnsubscribeUrl."
            }),
        ),
    ]
}

/// The conditions of those parameters.
pub(super) fn conditions() -> Vec<(String, Value)> {
    vec![(
        "HasUnsubscribeKey".into(),
        json!({"Fn::Not": [{"Fn::Equals": [r("UnsubscribeKeySecretArn"), ""]}]}),
    )]
}

/// The configuration set, its event destination, the rule and the hash key.
pub(super) fn resources(res: &mut Resources, names: &Topology) {
    res.add(
        CONFIGURATION_SET_ID,
        resource(
            "AWS::SES::ConfigurationSet",
            json!({"Name": sub(&format!("{PREFIX}-email"))}),
        ),
    );
    res.add(
        "SesEventDestination",
        resource(
            "AWS::SES::ConfigurationSetEventDestination",
            json!({
                "ConfigurationSetName": r(CONFIGURATION_SET_ID),
                "EventDestination": {
                    "Name": "bounces-and-complaints",
                    "Enabled": true,
                    "MatchingEventTypes": ["bounce", "complaint"],
                    "EventBridgeDestination": {
                        "EventBusArn": sub("arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:event-bus/default")
                    }
                }
            }),
        ),
    );
    let rule = names.ses_rule(r(CONFIGURATION_SET_ID));
    let queue = format!("{}Queue", super::logical_id(HandlerName::Notifications));
    res.add(
        RULE_ID,
        resource(
            "AWS::Events::Rule",
            json!({
                "Name": sub(&rule.name),
                "Description": rule.description,
                "EventBusName": rule.bus.name(),
                "EventPattern": rule.pattern,
                "State": "ENABLED",
                "Targets": [{
                    "Id": "queue",
                    "Arn": att(&queue, "Arn"),
                    "RetryPolicy": {"MaximumRetryAttempts": 185, "MaximumEventAgeInSeconds": 86400},
                    "DeadLetterConfig": {"Arn": att("BusDlq", "Arn")}
                }]
            }),
        ),
    );
    // Kept with the stack's data: a new key makes every suppressed address unknown again.
    res.add(
        HASH_KEY_ID,
        resource_on_removal(
            "AWS::SecretsManager::Secret",
            "Retain",
            json!({
                "Description": "Key of the email suppression list's address hashes (HMAC-SHA256)",
                "GenerateSecretString": {"PasswordLength": 64, "ExcludePunctuation": true},
                "Tags": tags("notifications")
            }),
        ),
    );
}

/// The notifications container's environment beyond the common one.
pub(super) fn environment() -> Vec<(&'static str, Value)> {
    vec![
        ("ORDERFLEET_SES_CONFIGURATION_SET", r(CONFIGURATION_SET_ID)),
        ("ORDERFLEET_UNSUBSCRIBE_URL", r("UnsubscribeUrl")),
    ]
}

/// The notifications container's secrets: `(variable, secret, condition)`.
pub(super) fn secrets() -> Vec<Value> {
    vec![
        json!({"Name": "ORDERFLEET_EMAIL_HASH_KEY", "ValueFrom": r(HASH_KEY_ID)}),
        json!({"Fn::If": ["HasUnsubscribeKey",
            {"Name": "ORDERFLEET_UNSUBSCRIBE_KEY", "ValueFrom": r("UnsubscribeKeySecretArn")},
            r("AWS::NoValue")]}),
    ]
}

/// The secrets ECS must read for the notifications task.
pub(super) fn execution_secrets() -> Vec<Value> {
    vec![
        r(HASH_KEY_ID),
        json!({"Fn::If": ["HasUnsubscribeKey", r("UnsubscribeKeySecretArn"), r("AWS::NoValue")]}),
    ]
}

/// The configuration set's ARN, which SES v2 authorises a send against besides the identity.
pub(super) fn configuration_set_arn() -> Value {
    sub(&format!(
        "arn:${{AWS::Partition}}:ses:${{AWS::Region}}:${{AWS::AccountId}}:configuration-set/${{{CONFIGURATION_SET_ID}}}"
    ))
}
