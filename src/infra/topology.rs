//! The fleet's AWS topology as data, in one place: the bus, one queue and DLQ per handler, and
//! the EventBridge rules that route each detail-type to the handlers that consume it.
//!
//! `orderfleet provision` applies it, the worker validates against it, and the CloudFormation
//! template in `deploy/` is generated from it (by the workspace's `xtask` crate) and checked
//! against it by a test. The routing itself comes from the event catalogue
//! ([`crate::domain::catalogue`]), so a new event needs one edit.

use crate::domain::names::HandlerName;

use serde_json::{json, Value};

use crate::domain::catalogue;
use crate::domain::platform::Platform;

/// The EventBridge bus every event travels on.
pub const BUS_NAME: &str = "orderfleet";
/// Default maxReceiveCount of each queue's redrive policy.
pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 5;
/// Retention of every DLQ: 14 days, the SQS maximum.
pub const DLQ_RETENTION_SECS: u32 = 14 * 24 * 3600;
/// Retention of every work queue: 4 days (the SQS default), well inside the DLQ's 14 days so a
/// message moved to the DLQ keeps most of its life there.
pub const QUEUE_RETENTION_SECS: u32 = 4 * 24 * 3600;
/// Default visibility timeout of each work queue.
pub const QUEUE_VISIBILITY_TIMEOUT_SECS: u32 = 60;

/// Names and settings for one deployment of the topology. `prefix` lets tests (and several
/// environments in one account) keep their resources apart.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
    pub bus_name: String,
    pub max_receive_count: u32,
    /// The lake bucket, when it is not `<prefix>-lake` (S3 bucket names are global, so an AWS
    /// account provisioned by hand needs a unique one; `--lake-bucket`).
    pub lake_bucket_override: Option<String>,
    /// Whether `provision` creates the lake (bucket and Firehose stream). Off for a topology
    /// without an analytics worker, e.g. most tests: the emulator allows only 50 streams.
    pub lake: bool,
    /// The commerce platforms' EventBridge partner event sources the storefront handler
    /// listens to (at most one per platform; `--partner-source`). Each gets a rule on its
    /// partner event bus into the storefront queue.
    pub partner_sources: Vec<String>,
    /// The SES configuration set whose email events (bounces, complaints) reach the
    /// notifications queue through a rule on the account's default bus
    /// (`--ses-configuration-set`); `None`: no such rule.
    pub ses_configuration_set: Option<String>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            prefix: "orderfleet".into(),
            bus_name: BUS_NAME.into(),
            max_receive_count: DEFAULT_MAX_RECEIVE_COUNT,
            lake_bucket_override: None,
            lake: true,
            partner_sources: Vec::new(),
            ses_configuration_set: None,
        }
    }
}

/// Where the delivery stream writes events in the lake bucket: one partition per UTC day of the
/// event's own EventBridge `time`, which Firehose's dynamic partitioning reads from each record
/// with [`LAKE_PARTITION_QUERY`] (AWS; moto keeps the expressions literally and appends the
/// arrival time, see [`crate::store::lake::reader`]). A late or replayed event lands under the
/// day it happened, where Athena's partition projection looks for it.
pub const LAKE_PREFIX: &str = "events/year=!{partitionKeyFromQuery:year}/month=!{partitionKeyFromQuery:month}/day=!{partitionKeyFromQuery:day}/";
/// The JQ query (JQ-1.6) that gives a record its partition keys: the date of its `time`
/// (`2026-12-06T05:19:12Z` -> year 2026, month 12, day 06).
pub const LAKE_PARTITION_QUERY: &str = "{year: .time[0:4], month: .time[5:7], day: .time[8:10]}";
/// Where Firehose writes records it could not deliver.
pub const LAKE_ERROR_PREFIX: &str = "errors/!{firehose:error-output-type}/year=!{timestamp:yyyy}/month=!{timestamp:MM}/day=!{timestamp:dd}/";

/// Everything provisioned for one handler.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerResources {
    pub handler: HandlerName,
    pub queue_name: String,
    pub dlq_name: String,
    pub rule_name: String,
    /// The EventBridge event pattern of the rule.
    pub pattern: Value,
    /// Rules on other buses that deliver into the handler's queue too.
    pub external_rules: Vec<ExternalRule>,
}

/// Which bus an [`ExternalRule`] is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalBus {
    /// A platform's partner event bus: named as its partner event source, and created by
    /// associating the source (CreateEventBus with EventSourceName).
    Partner(String),
    /// The account's default bus, where AWS services put their events.
    Default,
}

impl ExternalBus {
    /// The bus's name, as the EventBridge API takes it.
    pub fn name(&self) -> &str {
        match self {
            ExternalBus::Partner(name) => name,
            ExternalBus::Default => "default",
        }
    }
}

/// A rule on a bus other than the fleet's that delivers into a handler's queue: events from
/// outside the fleet (a commerce platform, an AWS service).
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalRule {
    pub handler: HandlerName,
    pub name: String,
    pub bus: ExternalBus,
    pub pattern: Value,
    pub description: String,
}

impl Topology {
    /// A topology whose resource names all start with `prefix` (`<prefix>-orders`, ...).
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        Topology {
            bus_name: prefix.clone(),
            prefix,
            ..Topology::default()
        }
    }

    pub fn queue_name(&self, handler: HandlerName) -> String {
        format!("{}-{}", self.prefix, handler.as_str())
    }

    pub fn dlq_name(&self, handler: HandlerName) -> String {
        format!("{}-{}-dlq", self.prefix, handler.as_str())
    }

    pub fn rule_name(&self, handler: HandlerName) -> String {
        format!("{}-to-{}", self.prefix, handler.as_str())
    }

    /// The Firehose delivery stream into the lake (`<prefix>-lake`, as in the CloudFormation
    /// stack).
    pub fn firehose_stream(&self) -> String {
        format!("{}-lake", self.prefix)
    }

    /// The lake's S3 bucket: the override, else `<prefix>-lake` in lower case (S3 bucket names
    /// allow no capitals). The CloudFormation stack names its bucket itself; readers find it
    /// through the delivery stream (see [`crate::store::lake::resolve_bucket`]).
    pub fn lake_bucket(&self) -> String {
        match &self.lake_bucket_override {
            Some(name) => name.clone(),
            None => format!("{}-lake", self.prefix).to_ascii_lowercase(),
        }
    }

    /// The IAM role Firehose assumes to write the bucket (`<prefix>-lake-delivery`). The
    /// CloudFormation stack creates it; `orderfleet provision` only refers to it, which is all
    /// the local emulator needs.
    pub fn lake_delivery_role(&self) -> String {
        format!("{}-lake-delivery", self.prefix)
    }

    pub fn resources(&self, handler: HandlerName) -> HandlerResources {
        HandlerResources {
            handler,
            queue_name: self.queue_name(handler),
            dlq_name: self.dlq_name(handler),
            rule_name: self.rule_name(handler),
            pattern: event_pattern(handler),
            external_rules: self
                .external_rules()
                .into_iter()
                .filter(|r| r.handler == handler)
                .collect(),
        }
    }

    /// Every rule on a bus other than the fleet's: one per partner event source, into the
    /// storefront queue, and with an SES configuration set the rule of its email events
    /// into the notifications queue.
    pub fn external_rules(&self) -> Vec<ExternalRule> {
        let mut rules = self.partner_rules();
        if let Some(set) = &self.ses_configuration_set {
            rules.push(self.ses_rule(serde_json::Value::String(set.clone())));
        }
        rules
    }

    /// The rule on the default bus that routes the bounces and complaints of the SES
    /// configuration set `set` (as JSON, so the template can pass an intrinsic) into the
    /// notifications queue. SES tags every event it publishes with its configuration set, so
    /// another sender in the account (or another environment) does not reach this fleet.
    pub fn ses_rule(&self, set: Value) -> ExternalRule {
        let detail_types: Vec<&str> = catalogue::external(crate::domain::ses::SOURCE)
            .filter(|e| e.consumers.contains(&HandlerName::Notifications))
            .map(|e| e.detail_type)
            .collect();
        ExternalRule {
            handler: HandlerName::Notifications,
            name: format!("{}-ses-to-notifications", self.prefix),
            bus: ExternalBus::Default,
            pattern: json!({
                "source": [crate::domain::ses::SOURCE],
                "detail-type": detail_types,
                "detail": {"mail": {"tags": {(crate::domain::ses::CONFIGURATION_SET_TAG): [set]}}}
            }),
            description: "Routes SES bounces and complaints of the fleet's configuration set to the notifications queue".into(),
        }
    }

    fn partner_rules(&self) -> Vec<ExternalRule> {
        self.partner_sources
            .iter()
            .filter_map(|source| {
                let platform = Platform::of_source(source)?;
                Some(ExternalRule {
                    handler: HandlerName::Storefront,
                    name: format!("{}-{}-to-storefront", self.prefix, platform.as_str()),
                    bus: ExternalBus::Partner(source.clone()),
                    pattern: platform.pattern(source),
                    description: format!(
                        "Routes {platform}'s events from its partner event source to the storefront queue"
                    ),
                })
            })
            .collect()
    }

    /// Checks the partner event sources: each names a platform, at most one per platform.
    pub fn check_partner_sources(&self) -> Result<(), String> {
        let mut seen = Vec::new();
        for source in &self.partner_sources {
            let platform = Platform::of_partner_source(source)?;
            if seen.contains(&platform) {
                return Err(format!(
                    "more than one {platform} partner event source given"
                ));
            }
            seen.push(platform);
        }
        Ok(())
    }

    pub fn all(&self) -> Vec<HandlerResources> {
        HandlerName::ALL
            .into_iter()
            .map(|h| self.resources(h))
            .collect()
    }

    /// The queue's RedrivePolicy attribute value.
    pub fn redrive_policy(&self, dlq_arn: &str) -> String {
        json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": self.max_receive_count})
            .to_string()
    }
}

/// The DLQ's RedriveAllowPolicy: only its own work queue may use it as a dead-letter queue.
pub fn redrive_allow_policy(source_queue_arn: &str) -> String {
    json!({"redrivePermission": "byQueue", "sourceQueueArns": [source_queue_arn]}).to_string()
}

/// The queue policy that lets exactly the EventBridge rules `rule_arns` send to the queue.
pub fn queue_policy(queue_arn: &str, rule_arns: &[&str]) -> String {
    // One ARN stays a string, as it always was, so a queue provisioned before has no change.
    let rule_arns = match rule_arns {
        [one] => json!(one),
        many => json!(many),
    };
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "AllowEventBridgeRule",
            "Effect": "Allow",
            "Principal": {"Service": "events.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": {"ArnEquals": {"aws:SourceArn": rule_arns}}
        }]
    })
    .to_string()
}

/// The event pattern routing every detail-type `handler` consumes (per the catalogue) to it.
/// Sources and detail-types are sorted so the pattern is stable and a second provision run
/// compares equal.
pub fn event_pattern(handler: HandlerName) -> Value {
    let mut sources: Vec<String> = Vec::new();
    let mut detail_types: Vec<&str> = Vec::new();
    for spec in catalogue::EVENTS
        .iter()
        .filter(|e| e.consumers.contains(&handler))
    {
        let source = spec.source();
        if !sources.contains(&source) {
            sources.push(source);
        }
        detail_types.push(spec.detail_type);
    }
    sources.sort();
    detail_types.sort();
    json!({"source": sources, "detail-type": detail_types})
}
