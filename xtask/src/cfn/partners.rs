//! The commerce platforms' partner event sources: for each platform a parameter naming its
//! source, and, when it is given, the partner event bus that associates the source and a rule
//! on it into the storefront queue. The rule names come from the topology
//! ([`Topology::external_rules`]); the source name, unknown until deploy time, is the
//! parameter's.

use orderfleet::domain::names::HandlerName;
use orderfleet::domain::platform::Platform;
use orderfleet::infra::topology::Topology;
use serde_json::{json, Value};

use super::{att, r, resource, sub, Resources};

/// The parameter naming `platform`'s partner event source.
pub(super) fn parameter(platform: Platform) -> &'static str {
    match platform {
        Platform::Shopify => "ShopifyEventSourceName",
        Platform::Commercetools => "CommercetoolsEventSourceName",
    }
}

/// The condition under which `platform`'s bus and rule exist.
pub(super) fn condition(platform: Platform) -> String {
    format!("Has{}", parameter(platform))
}

fn stem(platform: Platform) -> &'static str {
    match platform {
        Platform::Shopify => "Shopify",
        Platform::Commercetools => "Commercetools",
    }
}

/// The logical id of `platform`'s rule.
pub(super) fn rule_id(platform: Platform) -> String {
    format!("{}PartnerRule", stem(platform))
}

/// The parameters, one per platform.
pub(super) fn parameters() -> Vec<(&'static str, Value)> {
    Platform::ALL
        .into_iter()
        .map(|p| {
            (
                parameter(p),
                json!({
                    "Type": "String", "Default": "",
                    "AllowedPattern": format!("^$|^{}\\S+$", p.source_prefix().replace('.', "\\.")),
                    "Description": format!(
                        "The {p} EventBridge partner event source ({}...), once the platform is set up to send to this account and region; empty connects no {p} shop. See the README, Connecting your platform.",
                        p.source_prefix()
                    )
                }),
            )
        })
        .collect()
}

/// The template's conditions for the platforms.
pub(super) fn conditions() -> Vec<(String, Value)> {
    Platform::ALL
        .into_iter()
        .map(|p| {
            (
                condition(p),
                json!({"Fn::Not": [{"Fn::Equals": [r(parameter(p)), ""]}]}),
            )
        })
        .collect()
}

/// The ARNs of the platforms' rules, each present only when its platform is connected: for
/// the storefront queue's policy and the bus DLQ's.
pub(super) fn rule_arns() -> Vec<Value> {
    Platform::ALL
        .into_iter()
        .map(
            |p| json!({"Fn::If": [condition(p), att(&rule_id(p), "Arn"), {"Ref": "AWS::NoValue"}]}),
        )
        .collect()
}

/// Each platform's partner event bus and its rule into the storefront queue.
pub(super) fn resources(res: &mut Resources, names: &Topology) {
    let queue = format!("{}Queue", super::logical_id(HandlerName::Storefront));
    for platform in Platform::ALL {
        // The topology names the rule from any source of the platform.
        let sample = Topology {
            partner_sources: vec![format!("{}example", platform.source_prefix())],
            ..names.clone()
        };
        let Some(rule) = sample.external_rules().into_iter().next() else {
            continue;
        };
        let bus = format!("{}PartnerBus", stem(platform));
        let source = r(parameter(platform));
        res.add(
            bus.clone(),
            json!({
                "Type": "AWS::Events::EventBus",
                "Condition": condition(platform),
                "Properties": {"Name": source, "EventSourceName": source}
            }),
        );
        let mut rule_resource = resource(
            "AWS::Events::Rule",
            json!({
                "Name": sub(&rule.name),
                "Description": rule.description,
                "EventBusName": r(&bus),
                "EventPattern": {"source": [source]},
                "State": "ENABLED",
                "Targets": [{
                    "Id": "queue",
                    "Arn": att(&queue, "Arn"),
                    "RetryPolicy": {"MaximumRetryAttempts": 185, "MaximumEventAgeInSeconds": 86400},
                    "DeadLetterConfig": {"Arn": att("BusDlq", "Arn")}
                }]
            }),
        );
        rule_resource["Condition"] = json!(condition(platform));
        res.add(rule_id(platform), rule_resource);
    }
}

/// The storefront worker's write-back settings: the shop's currency and, in Secrets Manager,
/// each platform's API credentials. Without credentials the worker writes back to its
/// sandbox (a table), so a stack can take events before it may act on the platform.
pub(super) fn write_back_parameters() -> Vec<(&'static str, Value)> {
    vec![
        (
            "ShopCurrency",
            json!({"Type": "String", "Default": "USD", "AllowedPattern": "^[A-Z]{3}$", "Description": "The shop's currency (ISO 4217): what Shopify orders are charged in."}),
        ),
        (
            "ShopifyAccessTokenSecretArn",
            json!({"Type": "String", "Default": "", "Description": "ARN of a Secrets Manager secret holding the Shopify custom app's Admin API access token; empty: no write-back to Shopify."}),
        ),
        (
            "CommercetoolsClientId",
            json!({"Type": "String", "Default": "", "Description": "commercetools API client id (scopes manage_orders, manage_payments)."}),
        ),
        (
            "CommercetoolsClientSecretArn",
            json!({"Type": "String", "Default": "", "Description": "ARN of a Secrets Manager secret holding that API client's secret; empty: no write-back to commercetools."}),
        ),
        (
            "CommercetoolsRegionHost",
            json!({"Type": "String", "Default": "europe-west1.gcp.commercetools.com", "Description": "The commercetools region's host: the worker calls auth.<host> and api.<host>."}),
        ),
    ]
}

/// Conditions of the write-back settings.
pub(super) fn write_back_conditions() -> Vec<(String, Value)> {
    let not_empty = |p: &str| json!({"Fn::Not": [{"Fn::Equals": [r(p), ""]}]});
    vec![
        (
            "HasShopifyAccessToken".into(),
            not_empty("ShopifyAccessTokenSecretArn"),
        ),
        (
            "HasCommercetoolsClientSecret".into(),
            not_empty("CommercetoolsClientSecretArn"),
        ),
        (
            "HasPlatformCredentials".into(),
            json!({"Fn::Or": [{"Condition": "HasShopifyAccessToken"}, {"Condition": "HasCommercetoolsClientSecret"}]}),
        ),
    ]
}

/// The storefront container's environment beyond the common one.
pub(super) fn write_back_environment() -> Vec<(&'static str, Value)> {
    vec![
        ("ORDERFLEET_SHOP_CURRENCY", r("ShopCurrency")),
        (
            "ORDERFLEET_PLATFORM_API",
            json!({"Fn::If": ["HasPlatformCredentials", "live", "sandbox"]}),
        ),
        (
            "ORDERFLEET_COMMERCETOOLS_CLIENT_ID",
            r("CommercetoolsClientId"),
        ),
        (
            "ORDERFLEET_COMMERCETOOLS_AUTH_URL",
            sub("https://auth.${CommercetoolsRegionHost}"),
        ),
        (
            "ORDERFLEET_COMMERCETOOLS_API_URL",
            sub("https://api.${CommercetoolsRegionHost}"),
        ),
    ]
}

/// The storefront container's secrets, each present only when its ARN is given:
/// `(variable, parameter, condition)`.
pub(super) const WRITE_BACK_SECRETS: [(&str, &str, &str); 2] = [
    (
        "ORDERFLEET_SHOPIFY_ACCESS_TOKEN",
        "ShopifyAccessTokenSecretArn",
        "HasShopifyAccessToken",
    ),
    (
        "ORDERFLEET_COMMERCETOOLS_CLIENT_SECRET",
        "CommercetoolsClientSecretArn",
        "HasCommercetoolsClientSecret",
    ),
];
