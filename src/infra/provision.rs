//! `orderfleet provision`: creates or updates the topology idempotently. Every resource is
//! read first and written only when it differs, so a second run reports no change.
//!
//! Besides the bus, queues and rules, it creates the lake: the S3 bucket and the Firehose
//! delivery stream that writes into it (see [`crate::store::lake`]). The stream's IAM role is only
//! referred to by name ([`Topology::lake_delivery_role`]): the CloudFormation stack creates it
//! in AWS, and the local emulator does not check it.

use std::collections::HashMap;

use anyhow::{anyhow, Context, Result};
use aws_sdk_eventbridge::types::{RuleState, Target};
use aws_sdk_sqs::types::QueueAttributeName as Q;
use serde_json::Value;

use crate::domain::outcome::error_chain;
use crate::infra::aws::Clients;
use crate::infra::topology::{self, ExternalBus, HandlerResources, Topology};

/// One change made by a provision run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    pub resource: String,
    pub action: String,
}

fn change(changes: &mut Vec<Change>, resource: impl Into<String>, action: &str) {
    let c = Change {
        resource: resource.into(),
        action: action.into(),
    };
    tracing::info!(resource = %c.resource, action = %c.action, "provision");
    changes.push(c);
}

/// Applies `topo`. Returns what changed; empty when everything was already in place.
pub async fn provision(clients: &Clients, topo: &Topology) -> Result<Vec<Change>> {
    let mut changes = Vec::new();
    let bus_arn = ensure_bus(clients, &topo.bus_name, &mut changes).await?;
    for res in topo.all() {
        ensure_handler(clients, topo, &res, &mut changes)
            .await
            .with_context(|| format!("provisioning handler {}", res.handler))?;
    }
    if topo.lake {
        ensure_lake(clients, topo, &bus_arn, &mut changes)
            .await
            .context("provisioning the lake")?;
    }
    Ok(changes)
}

/// The lake bucket and the delivery stream into it. The stream is compared by its
/// destination's bucket and prefix; anything else about it is left as it is.
async fn ensure_lake(
    clients: &Clients,
    topo: &Topology,
    bus_arn: &str,
    changes: &mut Vec<Change>,
) -> Result<()> {
    // arn:<partition>:events:<region>:<account>:event-bus/<name>
    let arn: Vec<&str> = bus_arn.splitn(6, ':').collect();
    let (partition, region, account) = match arn.as_slice() {
        [_, partition, _, region, account, _] => (*partition, *region, *account),
        _ => return Err(anyhow!("unexpected event bus ARN {bus_arn}")),
    };
    let bucket = topo.lake_bucket();
    match clients.s3.head_bucket().bucket(&bucket).send().await {
        Ok(_) => {}
        Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {
            let mut create = clients.s3.create_bucket().bucket(&bucket);
            // us-east-1 is the one region that refuses an explicit location constraint.
            if region != "us-east-1" {
                create = create.create_bucket_configuration(
                    aws_sdk_s3::types::CreateBucketConfiguration::builder()
                        .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(
                            region,
                        ))
                        .build(),
                );
            }
            create
                .send()
                .await
                .map_err(|e| anyhow!("creating lake bucket {bucket}: {}", error_chain(&e)))?;
            change(changes, format!("bucket {bucket}"), "created");
        }
        Err(e) => {
            return Err(anyhow!(
                "looking up lake bucket {bucket} (if another account owns the name, choose one \
                 with --lake-bucket): {}",
                error_chain(&e)
            ))
        }
    }

    use aws_sdk_firehose::types::{
        BufferingHints, CompressionFormat, DeliveryStreamType, DynamicPartitioningConfiguration,
        ExtendedS3DestinationConfiguration, ExtendedS3DestinationUpdate, ProcessingConfiguration,
        Processor, ProcessorParameter, ProcessorParameterName, ProcessorType,
    };
    let stream = topo.firehose_stream();
    let bucket_arn = format!("arn:{partition}:s3:::{bucket}");
    let role_arn = format!(
        "arn:{partition}:iam::{account}:role/{}",
        topo.lake_delivery_role()
    );
    // As in the CloudFormation stack: five minutes or 64 MiB, whichever comes first.
    let hints = BufferingHints::builder()
        .interval_in_seconds(300)
        .size_in_mbs(64)
        .build();
    match clients
        .firehose
        .describe_delivery_stream()
        .delivery_stream_name(&stream)
        .send()
        .await
    {
        Ok(out) => {
            let Some(desc) = out.delivery_stream_description() else {
                return Err(anyhow!(
                    "DescribeDeliveryStream {stream} returned no description"
                ));
            };
            let destination = desc.destinations().first();
            let current = destination.and_then(|d| d.extended_s3_destination_description());
            let in_place = current.is_some_and(|c| {
                c.bucket_arn() == bucket_arn && c.prefix() == Some(topology::LAKE_PREFIX)
            });
            let partitioned_by_event_time = current
                .and_then(|c| c.dynamic_partitioning_configuration())
                .and_then(|d| d.enabled())
                == Some(true);
            if !in_place && !partitioned_by_event_time && current.is_some() {
                // Firehose cannot turn dynamic partitioning on for an existing stream.
                return Err(anyhow!(
                    "delivery stream {stream} partitions the lake by arrival time; Firehose \
                     cannot switch an existing stream to the event's time. Once it has flushed \
                     (5 minutes without traffic), delete it (`aws firehose \
                     delete-delivery-stream --delivery-stream-name {stream}`) and run \
                     `orderfleet provision` again"
                ));
            }
            if !in_place {
                let destination_id = destination
                    .map(|d| d.destination_id().to_string())
                    .unwrap_or_default();
                clients
                    .firehose
                    .update_destination()
                    .delivery_stream_name(&stream)
                    .current_delivery_stream_version_id(desc.version_id())
                    .destination_id(destination_id)
                    .extended_s3_destination_update(
                        ExtendedS3DestinationUpdate::builder()
                            .bucket_arn(&bucket_arn)
                            .role_arn(&role_arn)
                            .prefix(topology::LAKE_PREFIX)
                            .error_output_prefix(topology::LAKE_ERROR_PREFIX)
                            .buffering_hints(hints)
                            .compression_format(CompressionFormat::Uncompressed)
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow!("updating delivery stream {stream}: {}", error_chain(&e))
                    })?;
                change(
                    changes,
                    format!("delivery stream {stream}"),
                    "updated destination",
                );
            }
        }
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()) =>
        {
            // Partitioned by the event's own time, as in the CloudFormation stack.
            let parameter = |name: ProcessorParameterName, value: &str| {
                ProcessorParameter::builder()
                    .parameter_name(name)
                    .parameter_value(value)
                    .build()
                    .map_err(|e| anyhow!("building the lake's partitioning: {e}"))
            };
            let extract = Processor::builder()
                .r#type(ProcessorType::MetadataExtraction)
                .parameters(parameter(
                    ProcessorParameterName::MetadataExtractionQuery,
                    topology::LAKE_PARTITION_QUERY,
                )?)
                .parameters(parameter(
                    ProcessorParameterName::JsonParsingEngine,
                    "JQ-1.6",
                )?)
                .build()
                .map_err(|e| anyhow!("building the lake's partitioning: {e}"))?;
            let destination = ExtendedS3DestinationConfiguration::builder()
                .bucket_arn(&bucket_arn)
                .role_arn(&role_arn)
                .prefix(topology::LAKE_PREFIX)
                .error_output_prefix(topology::LAKE_ERROR_PREFIX)
                .buffering_hints(hints)
                .compression_format(CompressionFormat::Uncompressed)
                .dynamic_partitioning_configuration(
                    DynamicPartitioningConfiguration::builder()
                        .enabled(true)
                        .build(),
                )
                .processing_configuration(
                    ProcessingConfiguration::builder()
                        .enabled(true)
                        .processors(extract)
                        .build(),
                )
                .build()
                .map_err(|e| anyhow!("building the lake destination: {e}"))?;
            clients
                .firehose
                .create_delivery_stream()
                .delivery_stream_name(&stream)
                .delivery_stream_type(DeliveryStreamType::DirectPut)
                .extended_s3_destination_configuration(destination)
                .send()
                .await
                .map_err(|e| anyhow!("creating delivery stream {stream}: {}", error_chain(&e)))?;
            change(changes, format!("delivery stream {stream}"), "created");
        }
        Err(e) => {
            return Err(anyhow!(
                "describing delivery stream {stream}: {}",
                error_chain(&e)
            ))
        }
    }
    Ok(())
}

async fn ensure_bus(clients: &Clients, name: &str, changes: &mut Vec<Change>) -> Result<String> {
    match clients.events.describe_event_bus().name(name).send().await {
        Ok(out) => out.arn().map(str::to_string).context("bus without ARN"),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()) =>
        {
            let out = clients
                .events
                .create_event_bus()
                .name(name)
                .send()
                .await
                .map_err(|e| anyhow!("creating event bus {name}: {}", error_chain(&e)))?;
            change(changes, format!("event bus {name}"), "created");
            out.event_bus_arn()
                .map(str::to_string)
                .context("bus without ARN")
        }
        Err(e) => Err(anyhow!("describing event bus {name}: {}", error_chain(&e))),
    }
}

/// Creates the queue if missing, then sets every attribute in `want` that differs.
async fn ensure_queue(
    clients: &Clients,
    name: &str,
    want: &[(Q, String)],
    changes: &mut Vec<Change>,
) -> Result<(String, String)> {
    let url = match clients.sqs.get_queue_url().queue_name(name).send().await {
        Ok(out) => out.queue_url().unwrap_or_default().to_string(),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_queue_does_not_exist()) =>
        {
            let out = clients
                .sqs
                .create_queue()
                .queue_name(name)
                .set_attributes(Some(want.iter().cloned().collect()))
                .send()
                .await
                .map_err(|e| anyhow!("creating queue {name}: {}", error_chain(&e)))?;
            change(changes, format!("queue {name}"), "created");
            out.queue_url().unwrap_or_default().to_string()
        }
        Err(e) => return Err(anyhow!("looking up queue {name}: {}", error_chain(&e))),
    };
    let have = clients
        .sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(Q::All)
        .send()
        .await
        .map_err(|e| anyhow!("reading queue {name}: {}", error_chain(&e)))?
        .attributes
        .unwrap_or_default();
    let mut differing: HashMap<Q, String> = HashMap::new();
    for (k, v) in want {
        if same_attribute(have.get(k).map(String::as_str), v) {
            continue;
        }
        if !have.contains_key(k) && !attribute_supported(clients, &url, k).await {
            // moto 5.2.5, for one, does not know RedriveAllowPolicy. Setting it would be
            // accepted and forgotten, and every run would report a change.
            tracing::warn!(
                queue = name,
                attribute = k.as_str(),
                "the SQS endpoint does not support this attribute; skipped"
            );
            continue;
        }
        differing.insert(k.clone(), v.clone());
    }
    if !differing.is_empty() {
        let mut keys: Vec<_> = differing.keys().map(|k| k.as_str().to_string()).collect();
        keys.sort();
        clients
            .sqs
            .set_queue_attributes()
            .queue_url(&url)
            .set_attributes(Some(differing))
            .send()
            .await
            .map_err(|e| anyhow!("updating queue {name}: {}", error_chain(&e)))?;
        change(
            changes,
            format!("queue {name}"),
            &format!("set {}", keys.join(", ")),
        );
    }
    let arn = match have.get(&Q::QueueArn) {
        Some(arn) => arn.clone(),
        None => return Err(anyhow!("queue {name} has no QueueArn")),
    };
    Ok((url, arn))
}

/// Whether the endpoint knows attribute `k` at all: asking for it by name fails with
/// InvalidAttributeName when it does not.
async fn attribute_supported(clients: &Clients, url: &str, k: &Q) -> bool {
    match clients
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(k.clone())
        .send()
        .await
    {
        Ok(_) => true,
        Err(e) => !e
            .as_service_error()
            .is_some_and(|s| s.is_invalid_attribute_name()),
    }
}

/// Attribute values compare as JSON when both parse (policies come back reformatted, with
/// numbers as strings), else as text.
fn same_attribute(have: Option<&str>, want: &str) -> bool {
    let Some(have) = have else { return false };
    if have == want {
        return true;
    }
    match (
        serde_json::from_str::<Value>(have),
        serde_json::from_str::<Value>(want),
    ) {
        (Ok(a), Ok(b)) if a.is_object() => normalise(&a) == normalise(&b),
        _ => false,
    }
}

/// Numbers and numeric strings compare equal; arrays compare as sets of their items.
fn normalise(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::String(n.to_string()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), normalise(v))).collect())
        }
        Value::Array(a) => {
            let mut items: Vec<Value> = a.iter().map(normalise).collect();
            items.sort_by_key(|x| x.to_string());
            Value::Array(items)
        }
        other => other.clone(),
    }
}

async fn ensure_handler(
    clients: &Clients,
    topo: &Topology,
    res: &HandlerResources,
    changes: &mut Vec<Change>,
) -> Result<()> {
    let (_, dlq_arn) = ensure_queue(
        clients,
        &res.dlq_name,
        &[(
            Q::MessageRetentionPeriod,
            topology::DLQ_RETENTION_SECS.to_string(),
        )],
        changes,
    )
    .await?;
    let (_, queue_arn) = ensure_queue(
        clients,
        &res.queue_name,
        &[
            (
                Q::VisibilityTimeout,
                topology::QUEUE_VISIBILITY_TIMEOUT_SECS.to_string(),
            ),
            (
                Q::MessageRetentionPeriod,
                topology::QUEUE_RETENTION_SECS.to_string(),
            ),
            (Q::RedrivePolicy, topo.redrive_policy(&dlq_arn)),
            (Q::SqsManagedSseEnabled, "true".into()),
        ],
        changes,
    )
    .await?;
    // The DLQ accepts dead letters from its own queue only.
    ensure_queue(
        clients,
        &res.dlq_name,
        &[
            (
                Q::MessageRetentionPeriod,
                topology::DLQ_RETENTION_SECS.to_string(),
            ),
            (
                Q::RedriveAllowPolicy,
                topology::redrive_allow_policy(&queue_arn),
            ),
            (Q::SqsManagedSseEnabled, "true".into()),
        ],
        changes,
    )
    .await?;

    let mut rule_arns = vec![
        ensure_rule(
            clients,
            &topo.bus_name,
            &res.rule_name,
            &res.pattern,
            &format!("Routes the events {} consumes to its queue", res.handler),
            (&res.queue_name, &queue_arn),
            changes,
        )
        .await?,
    ];
    for rule in &res.external_rules {
        if let ExternalBus::Partner(source) = &rule.bus {
            ensure_partner_bus(clients, source, changes).await?;
        }
        rule_arns.push(
            ensure_rule(
                clients,
                rule.bus.name(),
                &rule.name,
                &rule.pattern,
                &rule.description,
                (&res.queue_name, &queue_arn),
                changes,
            )
            .await?,
        );
    }

    // The queue policy that lets these rules deliver.
    let rule_arns: Vec<&str> = rule_arns.iter().map(String::as_str).collect();
    ensure_queue(
        clients,
        &res.queue_name,
        &[(Q::Policy, topology::queue_policy(&queue_arn, &rule_arns))],
        changes,
    )
    .await?;
    Ok(())
}

/// A rule on `bus` with `pattern`, targeting the queue `(name, arn)`. The rule is compared by
/// its pattern as JSON and its state; the target by its ARN. Returns the rule's ARN.
async fn ensure_rule(
    clients: &Clients,
    bus: &str,
    rule_name: &str,
    pattern: &Value,
    description: &str,
    (queue_name, queue_arn): (&str, &str),
    changes: &mut Vec<Change>,
) -> Result<String> {
    let pattern = pattern.to_string();
    let rule = clients
        .events
        .describe_rule()
        .name(rule_name)
        .event_bus_name(bus)
        .send()
        .await;
    let rule_arn = match rule {
        Ok(out)
            if same_attribute(out.event_pattern(), &pattern)
                && out.state() == Some(&RuleState::Enabled) =>
        {
            out.arn().unwrap_or_default().to_string()
        }
        Ok(_) | Err(_) => {
            let existed = clients
                .events
                .describe_rule()
                .name(rule_name)
                .event_bus_name(bus)
                .send()
                .await
                .is_ok();
            let out = clients
                .events
                .put_rule()
                .name(rule_name)
                .event_bus_name(bus)
                .event_pattern(&pattern)
                .state(RuleState::Enabled)
                .description(description)
                .send()
                .await
                .map_err(|e| anyhow!("putting rule {rule_name}: {}", error_chain(&e)))?;
            change(
                changes,
                format!("rule {rule_name}"),
                if existed {
                    "updated pattern"
                } else {
                    "created"
                },
            );
            out.rule_arn().unwrap_or_default().to_string()
        }
    };

    let targets = clients
        .events
        .list_targets_by_rule()
        .rule(rule_name)
        .event_bus_name(bus)
        .send()
        .await
        .map_err(|e| anyhow!("listing targets of {rule_name}: {}", error_chain(&e)))?;
    let has_target = targets
        .targets()
        .iter()
        .any(|t| t.id() == "queue" && t.arn() == queue_arn);
    if !has_target {
        let target = Target::builder()
            .id("queue")
            .arn(queue_arn)
            .build()
            .map_err(|e| anyhow!("building target: {e}"))?;
        let out = clients
            .events
            .put_targets()
            .rule(rule_name)
            .event_bus_name(bus)
            .targets(target)
            .send()
            .await
            .map_err(|e| anyhow!("putting target of {rule_name}: {}", error_chain(&e)))?;
        if out.failed_entry_count() > 0 {
            return Err(anyhow!(
                "putting target of {rule_name}: {:?}",
                out.failed_entries()
            ));
        }
        change(
            changes,
            format!("target {rule_name} -> {queue_name}"),
            "created",
        );
    }
    Ok(rule_arn)
}

/// The partner event bus of a platform's partner event source. In AWS the source appears in
/// the account when the platform is set up to send to it (see the README, "Connecting your
/// platform"); creating the bus with the source's name and `EventSourceName` associates it.
/// A missing source is an error that says so.
async fn ensure_partner_bus(
    clients: &Clients,
    source: &str,
    changes: &mut Vec<Change>,
) -> Result<()> {
    match clients
        .events
        .describe_event_bus()
        .name(source)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()) =>
        {
            clients
                .events
                .create_event_bus()
                .name(source)
                .event_source_name(source)
                .send()
                .await
                .map_err(|e| {
                    anyhow!(
                        "associating the partner event source {source} (is it set up on the \
                         platform, and pending in this account and region?): {}",
                        error_chain(&e)
                    )
                })?;
            change(changes, format!("partner event bus {source}"), "created");
            Ok(())
        }
        Err(e) => Err(anyhow!(
            "describing event bus {source}: {}",
            error_chain(&e)
        )),
    }
}
